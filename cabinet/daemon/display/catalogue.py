# ruff: noqa: RUF001 - Chinese sentences use fullwidth punctuation, as Chinese does
"""Every sentence the rider's screen and voice say, in each language, keyed by code.

One catalogue keyed by the swap machine's prompt codes (``insert``, ``failed.<reason>``,
``rejected.<reason>``, ...) plus the screen's own codes (``idle.*``, ``safety.*``), so
the page holds no user-visible string and adding a language is adding a column.
A plain mapping rather than gettext ``.mo`` files: the catalogue is small, is checked
complete by a test, and the cabinet needs no build step to change a sentence.
``{bay}``, ``{n}``, ``{minutes}`` and ``{code}`` are filled in by the view model.
"""

from __future__ import annotations

LANGUAGES = ("en", "zh-CN")

CATALOGUE: dict[str, dict[str, str]] = {
    # -- idle ---------------------------------------------------------------------------
    "idle.title": {"en": "Battery swap", "zh-CN": "换电"},
    "idle.scan": {"en": "Scan this code with the app", "zh-CN": "请用App扫描此二维码"},
    "idle.pass": {"en": "or hold your pass to the scanner", "zh-CN": "或将您的通行码对准扫描器"},
    "idle.pass_only": {"en": "Hold your pass to the scanner", "zh-CN": "请将您的通行码对准扫描器"},
    "idle.app_offline": {
        "en": "The app cannot start a swap here right now",
        "zh-CN": "暂时无法通过App在此换电",
    },
    "idle.ready": {"en": "{n} full batteries ready", "zh-CN": "{n} 块满电电池可用"},
    "idle.ready_one": {"en": "1 full battery ready", "zh-CN": "1 块满电电池可用"},
    "idle.none_ready": {"en": "No full battery right now", "zh-CN": "暂无满电电池"},
    "idle.charging_eta": {
        "en": "next one full in about {minutes} min",
        "zh-CN": "下一块约 {minutes} 分钟后充满",
    },
    "session.bay": {"en": "Bay", "zh-CN": "仓位"},
    "session.seconds_left": {"en": "seconds left", "zh-CN": "秒"},
    # -- the steps (prompt codes of cabinet/core/swap_machine.py) ------------------------------
    "opening_return": {
        "en": "Bay {bay} is opening for your battery",
        "zh-CN": "{bay} 号仓门正在打开，请放入您的电池",
    },
    "insert": {
        "en": "Put your battery in bay {bay}, plug it in and shut the door",
        "zh-CN": "请将电池放入 {bay} 号仓，插好插头并关好仓门",
    },
    "opening_dispense": {
        "en": "Bay {bay} is opening: take your full battery",
        "zh-CN": "{bay} 号仓门正在打开，请取走满电电池",
    },
    "take": {
        "en": "Take the battery from bay {bay} and shut the door",
        "zh-CN": "请从 {bay} 号仓取出电池并关好仓门",
    },
    "giving_back": {
        "en": "Sorry, no battery can be handed out: take yours back from bay {bay}",
        "zh-CN": "抱歉，暂无电池可取：请从 {bay} 号仓取回您的电池",
    },
    "completed": {"en": "Thank you, ride safe!", "zh-CN": "换电完成，祝您骑行平安！"},
    # -- a refused deposit: take it back --------------------------------------------------
    "rejected.not_plugged": {
        "en": "The battery was not plugged in: take it back from bay {bay} and scan again",
        "zh-CN": "电池未插好：请从 {bay} 号仓取回电池，然后重新扫码",
    },
    "rejected.unidentified": {
        "en": "This battery cannot be read: take it back from bay {bay}",
        "zh-CN": "无法识别此电池：请从 {bay} 号仓取回",
    },
    "rejected.foreign": {
        "en": "This battery is not one of ours: take it back from bay {bay}",
        "zh-CN": "此电池不属于本平台：请从 {bay} 号仓取回",
    },
    "rejected.faulted": {
        "en": "This battery reports a fault: take it back from bay {bay} and contact support",
        "zh-CN": "此电池报告故障：请从 {bay} 号仓取回并联系客服",
    },
    "rejected.too_hot": {
        "en": "This battery is too hot: take it back from bay {bay}, let it cool and try again",
        "zh-CN": "电池温度过高：请从 {bay} 号仓取回，冷却后再试",
    },
    "rejected.too_cold": {
        "en": "This battery is too cold: take it back from bay {bay}, warm it up and try again",
        "zh-CN": "电池温度过低：请从 {bay} 号仓取回，回温后再试",
    },
    # -- every swap.failed reason (docs/swap.md §3): what happened, what to do next --------
    "failed.no_dispensable_battery": {
        "en": "No charged battery is available. Please try again later or another cabinet",
        "zh-CN": "暂无满电电池，请稍后再试或前往其他换电柜",
    },
    "failed.no_empty_bay": {
        "en": "No free bay for your battery. Please try another cabinet",
        "zh-CN": "没有空仓可放电池，请前往其他换电柜",
    },
    "failed.door_failed": {
        "en": "Sorry, no bay could be opened. Contact support with code {code}",
        "zh-CN": "抱歉，仓门无法打开。请联系客服，代码 {code}",
    },
    "failed.nothing_deposited": {
        "en": "No battery was detected: the swap is cancelled. Scan again to retry",
        "zh-CN": "未检测到电池，本次换电已取消。请重新扫码",
    },
    "failed.deposit_timeout": {
        "en": "Time is up: the swap is cancelled. Scan again to retry",
        "zh-CN": "超时，本次换电已取消。请重新扫码",
    },
    "failed.deposit_rejected": {
        "en": "Your battery was not accepted. Contact support with code {code}",
        "zh-CN": "您的电池未被接收。请联系客服，代码 {code}",
    },
    "failed.not_collected": {
        "en": "The battery was not taken: the swap has ended. Scan again to retry",
        "zh-CN": "电池未被取走，本次换电已结束。请重新扫码",
    },
    "failed.bay_offline": {
        "en": "Sorry, this bay stopped responding. Contact support with code {code}",
        "zh-CN": "抱歉，该仓无响应。请联系客服，代码 {code}",
    },
    "failed.dispense_failed": {
        "en": "Sorry, no battery could be handed out. Contact support with code {code}",
        "zh-CN": "抱歉，无法发放电池。请联系客服，代码 {code}",
    },
    "failed.smoke": {
        "en": "The cabinet stopped this session for safety. Step away from the cabinet",
        "zh-CN": "出于安全原因，换电柜已中止本次换电。请远离换电柜",
    },
    # -- the cabinet as a whole ----------------------------------------------------------
    "safety.smoke.title": {"en": "Smoke detected", "zh-CN": "检测到烟雾"},
    "safety.smoke": {
        "en": "Step away from the cabinet. Do not open any door. Call the emergency number",
        "zh-CN": "请远离换电柜，切勿打开任何仓门，并拨打紧急电话",
    },
    "safety.mains_lost.title": {"en": "Power failure", "zh-CN": "电源故障"},
    "safety.mains_lost": {
        "en": "The cabinet has no mains power. Swaps may be slow; charging has stopped",
        "zh-CN": "换电柜市电中断，充电已停止，换电可能较慢",
    },
    "safety.lockout.title": {"en": "Cabinet locked", "zh-CN": "换电柜已锁定"},
    "safety.lockout": {
        "en": "Swaps are stopped for safety. Please use another cabinet",
        "zh-CN": "出于安全原因已暂停换电，请前往其他换电柜",
    },
    "out_of_service.title": {"en": "Out of service", "zh-CN": "暂停服务"},
    "out_of_service": {
        "en": "This cabinet cannot swap batteries right now. Please use another cabinet",
        "zh-CN": "此换电柜暂时无法换电，请前往其他换电柜",
    },
}


def text(key: str, language: str, /, **values: object) -> str:
    """The sentence for ``code`` in ``language`` (English when missing), filled in."""
    entry = CATALOGUE.get(key)
    if entry is None:
        return key
    return entry.get(language, entry["en"]).format(**values)
