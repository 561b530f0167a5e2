// Listing page (the seller's or an admin's view): follow the listing's open packaging jobs, named in the
// data-jobs attribute of #job-progress, through the JSON API (cookie auth, GET only); reload once they have
// all ended so the page shows the builds, their quality reports or the reasons they failed.
(function () {
  const holder = document.getElementById('job-progress');
  if (!holder) return;
  const jobs = JSON.parse(holder.dataset.jobs || '[]');
  if (!jobs.length) return;
  async function poll() {
    let open = 0;
    for (const id of jobs) {
      let j;
      try {
        const r = await fetch('/api/v1/jobs/' + encodeURIComponent(id), {credentials: 'same-origin'});
        if (!r.ok) continue;
        j = await r.json();
      } catch (e) {
        open += 1;  // the store is restarting: keep following
        continue;
      }
      // Each version has its own section; a build is named by its target within it.
      const scope = document.querySelector('[data-version="' + j.version + '"]') || document;
      const bar = scope.querySelector('[data-build-progress="' + j.target + '"]');
      const msg = scope.querySelector('[data-build-message="' + j.target + '"]');
      const status = scope.querySelector('[data-build-status="' + j.target + '"]');
      if (bar) bar.value = j.progress;
      if (msg) msg.textContent = j.message;
      if (status) status.textContent = j.build_status;
      if (j.state === 'queued' || j.state === 'running') open += 1;
    }
    // Reload once the last job ended while the page still showed one in progress (not again after that).
    if (open) setTimeout(poll, 1000); else if (document.querySelector('progress')) location.reload();
  }
  poll();
})();
