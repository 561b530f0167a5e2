// Listing page: poll the packaging jobs named in [data-poll-jobs] (cookie auth, GET only) and reload the
// page when they have all finished. A file of its own: the pages' Content-Security-Policy allows no inline script.
(function () {
  const holder = document.querySelector('[data-poll-jobs]');
  if (!holder) return;
  const jobs = holder.dataset.pollJobs.split(',').filter(Boolean);
  async function poll() {
    let open = 0;
    for (const id of jobs) {
      const r = await fetch('/api/v1/jobs/' + encodeURIComponent(id), {credentials: 'same-origin'});
      if (!r.ok) continue;
      const j = await r.json();
      const bar = document.querySelector('[data-build-progress="' + j.target + '"]');
      const msg = document.querySelector('[data-build-message="' + j.target + '"]');
      if (bar) bar.value = j.progress;
      if (msg) msg.textContent = j.message;
      if (j.state === 'queued' || j.state === 'running') open += 1;
    }
    if (open) setTimeout(poll, 1000); else if (document.querySelector('progress')) location.reload();
  }
  poll();
})();
