(function () {
  'use strict';
  var parts = location.pathname.split('/').filter(Boolean), token = decodeURIComponent(parts[parts.length - 1]);
  var cur = null, sel = [], t0 = 0, busy = false;
  function $(id) { return document.getElementById(id); }
  function say(t) { $('message').textContent = t || ''; }
  function update() {
    var cells = document.querySelectorAll('.cell');
    for (var k = 0; k < cells.length; k++) {
      var on = sel.indexOf(+cells[k].dataset.index) >= 0;
      cells[k].classList.toggle('on', on); cells[k].setAttribute('aria-pressed', String(on));
    }
    $('submit').disabled = busy || !cur || (cur.kind === 'pair' && sel.length !== 1);
  }
  function choose(i) {
    if (!cur || i >= cur.images.length) return;
    if (cur.kind === 'pair') sel = [i];
    else if (sel.indexOf(i) >= 0) sel.splice(sel.indexOf(i), 1); else sel.push(i);
    update();
  }
  function render() {
    var box = $('images'); box.innerHTML = ''; box.className = cur.kind;
    cur.images.forEach(function (u, i) {
      var b = document.createElement('button'); b.type = 'button'; b.className = 'cell'; b.dataset.index = i;
      var img = document.createElement('img'); img.src = u; img.alt = 'image ' + (i + 1); img.width = cur.size; img.height = cur.size;
      var k = document.createElement('span'); k.className = 'key'; k.textContent = String(i + 1);
      b.appendChild(img); b.appendChild(k); b.addEventListener('click', function () { choose(i); }); box.appendChild(b);
    });
    $('instructions').textContent = cur.kind === 'grid'
      ? 'Select every image you believe is a REAL chest x-ray (none, some or all), then press Next.'
      : 'One image is real and one is generated: select the REAL one, then press Next.';
    $('progress').textContent = 'Item ' + (cur.answered + 1) + ' of ' + cur.total;
    $('submit').hidden = false; document.body.dataset.state = cur.kind; document.body.dataset.item = cur.item; update();
  }
  function next() {
    say('');
    return fetch('/api/next?token=' + encodeURIComponent(token), {cache: 'no-store'}).then(function (r) {
      return r.json().then(function (j) {
        if (!r.ok) { say(j.error || ('error ' + r.status)); document.body.dataset.state = 'error'; return; }
        if (j.done) {
          cur = null; $('images').innerHTML = ''; $('submit').hidden = true;
          $('instructions').textContent = 'Thank you: every item is answered. You can close this page.';
          $('progress').textContent = j.answered + ' of ' + j.total + ' answered'; document.body.dataset.state = 'done'; return;
        }
        cur = j; sel = []; render(); t0 = performance.now();
      });
    }).catch(function () { say('The study server does not answer; your saved answers are kept. Reload this page in a moment.'); });
  }
  function submit() {
    if (!cur || busy) return;
    if (cur.kind === 'pair' && sel.length !== 1) { say('Select one image first.'); return; }
    busy = true; update();
    var body = {token: token, item: cur.item, real: sel.slice().sort(function (a, b) { return a - b; }),
                client_seconds: (performance.now() - t0) / 1000};
    fetch('/api/answer', {method: 'POST', headers: {'Content-Type': 'application/json'}, body: JSON.stringify(body)})
      .then(function (r) {
        return r.json().catch(function () { return {}; }).then(function (j) {
          busy = false;
          if (!r.ok && r.status !== 409) { say(j.error || ('error ' + r.status)); update(); return; }
          return next();
        });
      })
      .catch(function () { busy = false; update(); say('Not saved: the study server does not answer. Press Next again in a moment.'); });
  }
  document.addEventListener('keydown', function (e) {
    if (!cur || e.altKey || e.ctrlKey || e.metaKey) return;
    if (e.key >= '1' && e.key <= '9') { choose(+e.key - 1); e.preventDefault(); }
    else if (cur.kind === 'pair' && e.key === 'ArrowLeft') { choose(0); e.preventDefault(); }
    else if (cur.kind === 'pair' && e.key === 'ArrowRight') { choose(1); e.preventDefault(); }
    else if (e.key === 'Enter') { e.preventDefault(); submit(); }
  });
  $('submit').addEventListener('click', submit);
  next();
})();
