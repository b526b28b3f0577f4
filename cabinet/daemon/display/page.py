"""The kiosk page: one self-contained HTML document (no external assets, no words).

Every sentence arrives worded by the view model over server-sent events; the page only
places it. EventSource reconnects by itself, so a daemon restart heals the screen.
Pictograms are inline SVG keyed by the step. Layout switches on the configured
orientation (800x480 landscape, 1080x1920 portrait); sizes are in viewport units so the
bay number reads from two metres on both.
"""

from __future__ import annotations

_ICONS = {
    "door": '<rect x="20" y="10" width="60" height="80" rx="4"/>'
    '<path d="M80 10 L100 25 V95 L80 90"/><circle cx="70" cy="52" r="4"/>',
    "insert": '<rect x="30" y="45" width="40" height="50" rx="4"/>'
    '<path d="M50 5 V36 M38 24 L50 36 L62 24"/>',
    "take": '<rect x="30" y="45" width="40" height="50" rx="4"/>'
    '<path d="M50 40 V8 M38 20 L50 8 L62 20"/>',
    "done": '<circle cx="50" cy="50" r="42"/><path d="M28 52 L44 68 L74 34"/>',
    "failed": '<circle cx="50" cy="50" r="42"/><path d="M50 24 V58 M50 70 V76"/>',
    "smoke": '<path d="M50 8 L94 88 H6 Z"/><path d="M50 36 V64 M50 74 V78"/>',
    "power": '<path d="M56 6 L24 56 H48 L42 94 L76 40 H52 Z"/>',
    "stop": '<circle cx="50" cy="50" r="42"/><path d="M22 78 L78 22"/>',
    "scan": "",
}


def _icons_js() -> str:
    pairs = ",".join(f"\"{k}\":'{v}'" for k, v in _ICONS.items())
    return "{" + pairs + "}"


def render(orientation: str) -> str:
    """The page for a landscape or portrait screen."""
    return _PAGE.replace("__ORIENTATION__", orientation).replace("__ICONS__", _icons_js())


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>cabinet</title>
<style>
html,body{margin:0;height:100%;background:#000;color:#fff;
 font-family:"Noto Sans CJK SC","WenQuanYi Micro Hei","DejaVu Sans",sans-serif;overflow:hidden}
#root{display:flex;height:100vh;width:100vw;box-sizing:border-box;padding:3vmin;gap:4vmin;
 align-items:center;justify-content:center}
body.landscape #root{flex-direction:row}
body.portrait #root{flex-direction:column}
#side{display:flex;flex-direction:column;align-items:center;justify-content:center}
#main{display:flex;flex-direction:column;justify-content:center;gap:2.5vmin;max-width:60vw}
body.portrait #main{max-width:92vw;text-align:center}
#title{font-size:8vmin;font-weight:bold;color:#ffd400}
#lines div{font-size:5.2vmin;line-height:1.25;margin:1vmin 0}
#lines div:first-child{font-size:6.2vmin;font-weight:bold}
#qr{background:#fff;line-height:0}
#qr svg{width:44vmin;height:44vmin}
body.portrait #qr svg{width:70vmin;height:70vmin}
#baybox{text-align:center}
#baylabel{font-size:6vmin;color:#ffd400}
#bay{font-size:38vmin;font-weight:bold;line-height:1;color:#fff}
body.portrait #bay{font-size:55vmin}
#icon svg{width:22vmin;height:22vmin;fill:none;stroke:#ffd400;stroke-width:6;
 stroke-linecap:round;stroke-linejoin:round}
#countdown{font-size:7vmin;font-weight:bold}
#countdown span{font-size:4vmin;font-weight:normal;margin-left:1vmin}
body.k-safety{background:#b00000}
body.k-safety #title{color:#fff;font-size:11vmin}
body.k-safety #icon svg{stroke:#fff}
body.k-out_of_service{background:#333}
body.k-result.s-done #icon svg{stroke:#3ddc5a}
body.k-result.s-failed #icon svg{stroke:#ff5a36}
.hidden{display:none!important}
#offline{position:fixed;bottom:1vmin;right:2vmin;font-size:3vmin;color:#888}
</style></head>
<body class="__ORIENTATION__">
<div id="root">
 <div id="side"><div id="qr" class="hidden"></div>
  <div id="baybox" class="hidden"><div id="baylabel"></div><div id="bay"></div></div></div>
 <div id="main"><div id="icon"></div><div id="title"></div><div id="lines"></div>
  <div id="countdown" class="hidden"></div></div>
</div>
<div id="offline" class="hidden">&#x21bb;</div>
<script>
"use strict";
const ICONS=__ICONS__;
const $=(id)=>document.getElementById(id);
function show(el,on){el.classList.toggle("hidden",!on);}
function render(s){
 document.documentElement.lang=s.language;
 document.body.className=document.body.className.replace(/\\b[ks]-\\S+/g,"").trim()
  +" k-"+s.kind+" s-"+s.step;
 document.body.dataset.kind=s.kind;
 document.body.dataset.prompt=s.prompt_code;
 $("title").textContent=s.title;
 const lines=$("lines");lines.replaceChildren();
 for(const t of s.lines){
  const d=document.createElement("div");d.textContent=t;lines.appendChild(d);}
 const icon=ICONS[s.step]||"";
 $("icon").innerHTML=icon?'<svg viewBox="0 0 100 100">'+icon+"</svg>":"";
 $("qr").innerHTML=s.qr_svg;show($("qr"),!!s.qr_svg);
 show($("baybox"),s.bay!==null);
 $("baylabel").textContent=s.bay_label;$("bay").textContent=s.bay===null?"":String(s.bay);
 const cd=$("countdown");show(cd,s.countdown_s!==null);
 if(s.countdown_s!==null){cd.textContent=String(s.countdown_s);
  const u=document.createElement("span");u.textContent=s.countdown_label;cd.appendChild(u);}
}
function connect(){
 const es=new EventSource("events");
 es.onmessage=(m)=>{show($("offline"),false);render(JSON.parse(m.data));};
 es.onerror=()=>{show($("offline"),true);};
}
connect();
</script></body></html>
"""
