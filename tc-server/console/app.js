// Ferrata console: a client of the coordinator's /v1 API, like the `ferrata` command line.
// Pages are drawn from the hash (`#/txns?status=RollbackFailed`), so any view can be linked
// from a ticket. Every value from the server goes into the page as text, never as HTML.
// Interactive elements carry data-testid attributes (the browser tests use them).

const view = document.getElementById('view');
const dialog = document.getElementById('dialog');
let me = null;      // {name, role, may: {...}}
let csrf = null;    // the console session's CSRF token, sent with every change

// ---- the API ------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body) {
    super(body && body.message ? body.message : `HTTP ${status}`);
    this.status = status;
    this.code = body && body.code;
    this.body = body;
  }
}

async function api(method, path, body) {
  const headers = { 'X-Ferrata-Client': 'console' };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  if (csrf && method !== 'GET') headers['X-CSRF-Token'] = csrf;
  const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body), credentials: 'same-origin' });
  let json = null;
  try { json = await r.json(); } catch (_) { /* not JSON */ }
  if (!r.ok) throw new ApiError(r.status, json);
  return json;
}
const get = (path) => api('GET', path);
const post = (path, body) => api('POST', path, body || {});

// ---- drawing helpers ----------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'on') for (const [ev, fn] of Object.entries(v)) el.addEventListener(ev, fn);
    else if (k === 'testid') el.dataset.testid = v;
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat()) if (c !== null && c !== undefined && c !== false) el.append(c instanceof Node ? c : String(c));
  return el;
}

function table(headers, rows, testid) {
  return h('table', { testid }, h('thead', {}, h('tr', {}, headers.map((x) => h('th', {}, x)))), h('tbody', {}, rows));
}

function ago(ms) {
  const s = Math.max(0, Math.floor((Date.now() - ms) / 1000));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m`;
  if (s < 86400) return `${Math.floor(s / 3600)}h`;
  return `${Math.floor(s / 86400)}d`;
}

function time(ms) { return ms ? new Date(ms).toISOString().replace('T', ' ').replace('Z', ' UTC') : '-'; }
const badge = (text) => h('span', { class: `badge ${text}` }, text);
const link = (href, text, testid) => h('a', { href, testid }, text);
const xidLink = (xid) => link(`#/txn/${encodeURIComponent(xid)}`, xid, `txn-${xid}`);

function show(...nodes) { view.replaceChildren(...nodes.filter((n) => n !== null && n !== undefined && n !== false)); }

function failure(e) {
  return h('p', { class: 'error', testid: 'error' }, e instanceof ApiError ? `${e.code}: ${e.message}` : String(e));
}

// The hash: `#/path?a=b` → ['path', ...], {a: 'b'}.
function route() {
  const hash = location.hash.replace(/^#\/?/, '');
  const [path, query] = hash.split('?');
  return { parts: path.split('/').filter(Boolean).map(decodeURIComponent), params: new URLSearchParams(query || '') };
}

// ---- login --------------------------------------------------------------------------

async function start() {
  try {
    me = await get('/v1/whoami');
  } catch (e) {
    if (e.status === 401) return loginPage();
    return show(failure(e));
  }
  try { csrf = (await get('/v1/session')).csrf; } catch (_) { csrf = null; /* no session: no token exists */ }
  document.getElementById('nav').hidden = false;
  document.querySelector('[data-testid=nav-tokens]').hidden = !me.may.administer;
  document.getElementById('me').textContent = `${me.name} (${me.role})`;
  const logout = document.getElementById('logout');
  logout.hidden = !csrf;
  logout.onclick = async () => { await api('DELETE', '/v1/session'); location.hash = '#/'; location.reload(); };
  if (!listening) window.addEventListener('hashchange', render);
  listening = true;
  render();
}

let listening = false;

function loginPage() {
  const token = h('input', { type: 'password', testid: 'token', autocomplete: 'off', placeholder: 'ftc_…' });
  const message = h('p', { class: 'error', testid: 'login-error' });
  const form = h('form', { class: 'login', on: { submit: async (ev) => {
    ev.preventDefault();
    try {
      const s = await post('/v1/session', { token: token.value.trim() });
      csrf = s.csrf;
      await start();
    } catch (e) { message.textContent = e.message; }
  } } },
  h('h1', {}, 'Log in'),
  h('p', { class: 'muted' }, 'Paste your token. The console keeps a session cookie, not the token.'),
  token, h('p', {}, h('button', { class: 'primary', type: 'submit', testid: 'login' }, 'Log in')), message);
  show(form);
}

// ---- pages --------------------------------------------------------------------------

let renders = 0;

async function render() {
  const { parts, params } = route();
  for (const a of document.querySelectorAll('header nav a')) a.classList.toggle('active', a.getAttribute('href') === `#/${parts[0] || ''}`);
  // Pages load asynchronously: only the latest one may draw (an older one finishing
  // later would cover it).
  const generation = ++renders;
  const draw = (...nodes) => { if (generation === renders) show(...nodes); };
  draw(h('p', { class: 'muted' }, 'Loading…'));
  try {
    if (parts.length === 0) return await attentionPage(draw);
    if (parts[0] === 'txns') return await transactionsPage(params, draw);
    // A branch is a number: nothing from the address may steer a request elsewhere.
    if (parts[0] === 'txn' && parts[2] === 'branch') {
      if (!/^\d+$/.test(parts[3] || '')) return draw(h('p', { class: 'error' }, 'Not a branch id.'));
      return await dirtyPage(parts[1], parts[3], draw);
    }
    if (parts[0] === 'txn') return await transactionPage(parts[1], draw);
    if (parts[0] === 'locks') return await locksPage(draw);
    if (parts[0] === 'audit') return await auditPage(params, draw);
    if (parts[0] === 'proxies') return await proxiesPage(draw);
    if (parts[0] === 'tokens') return await tokensPage(draw);
    draw(h('p', {}, 'No such page.'));
  } catch (e) {
    if (e.status === 401) return loginPage();
    draw(failure(e));
  }
}

const FAILED = ['RollbackFailed', 'TimeoutRollbackFailed', 'CommitFailed'];
const RETRYING = ['RollbackRetrying', 'TimeoutRollbackRetrying', 'AsyncCommitting'];

async function attentionPage(draw) {
  const lists = await Promise.all([...FAILED, ...RETRYING].map((s) => get(`/v1/transactions?status=${s}&limit=1000`)));
  const failed = lists.slice(0, 3).flatMap((l) => l.transactions);
  const retrying = lists.slice(3).flatMap((l) => l.transactions);
  const [locks, deadlocks, rms] = await Promise.all([get('/v1/locks?limit=10000'), get('/v1/deadlocks'), get('/v1/resource-managers')]);
  const longHeld = locks.locks.filter((l) => Date.now() - l.since_ms > 60_000);
  const waited = locks.locks.filter((l) => l.waiters.length > 0);
  const recentDeadlocks = deadlocks.deadlocks.filter((d) => Date.now() - d.at_ms < 3_600_000);
  const stale = rms.resource_managers.filter((r) => r.last_heartbeat_ms_ago > 2 * rms.heartbeat_interval_ms);
  const card = (title, n, href, testid, kind) => h('a', { href, class: `card ${n ? kind : 'ok'}`, testid },
    h('div', { class: 'n' }, n), h('div', {}, title));
  draw(
    h('h1', {}, 'Attention'),
    h('div', { class: 'cards' },
      card('failed transactions (held for a DBA)', failed.length, '#/txns?status=RollbackFailed', 'card-failed', 'bad'),
      card('transactions retrying phase 2', retrying.length, '#/txns?status=RollbackRetrying', 'card-retrying', 'warn'),
      card('rows locked longer than a minute', longHeld.length, '#/locks', 'card-long-locks', 'warn'),
      card('rows with waiters', waited.length, '#/locks', 'card-waiters', 'warn'),
      card('deadlocks in the last hour', recentDeadlocks.length, '#/locks', 'card-deadlocks', 'warn'),
      card('proxies with stale heartbeats', stale.length, '#/proxies', 'card-stale', 'bad')),
    h('h2', {}, 'Failed transactions'),
    failed.length ? txnTable(failed) : h('p', { class: 'muted', testid: 'nothing-failed' }, 'None.'));
}

function txnTable(list) {
  return table(['XID', 'Name', 'Status', 'Age', 'Branches', 'Version', 'Failure'], list.map((x) => h('tr', {},
    h('td', {}, xidLink(x.xid)), h('td', {}, x.name || '-'), h('td', {}, badge(x.status), x.paused ? ' paused' : ''),
    h('td', {}, ago(x.begin_ms)), h('td', {}, x.branch_count), h('td', {}, x.version),
    h('td', {}, x.failure ? x.failure.reason.slice(0, 90) : '-'))), 'txn-table');
}

async function transactionsPage(params, draw) {
  const status = params.get('status') || '';
  const select = h('select', { testid: 'filter-status', on: { change: () => {
    location.hash = select.value ? `#/txns?status=${select.value}` : '#/txns';
  } } }, h('option', { value: '' }, 'any status'),
  ['Begin', 'AsyncCommitting', ...FAILED, 'RollbackRetrying', 'TimeoutRollbackRetrying', 'Committed', 'Rollbacked', 'TimeoutRollbacked']
    .map((s) => h('option', { value: s, selected: s === status }, s)));
  const list = await get(`/v1/transactions?limit=500${status ? `&status=${status}` : ''}`);
  draw(h('h1', {}, 'Transactions'), h('div', { class: 'filters' }, 'Status', select), txnTable(list.transactions));
}

// ---- a transaction: header, timeline, events, branches --------------------------------

async function transactionPage(xid, draw) {
  const [t, events] = await Promise.all([get(`/v1/transactions/${encodeURIComponent(xid)}`), get(`/v1/transactions/${encodeURIComponent(xid)}/events`)]);
  const failedBranch = t.failure && t.failure.branch_id;
  const actions = [];
  if (me.may.act && t.status.endsWith('Failed')) {
    actions.push(h('button', { testid: 'action-retry', on: { click: () => txnAction(t, 'retry') } }, t.status === 'CommitFailed' ? 'Retry commit' : 'Retry rollback'));
    actions.push(h('button', { class: 'danger', testid: 'action-resolve', on: { click: () => txnAction(t, 'resolve') } }, 'Mark resolved'));
  }
  if (me.may.act && !t.finished && (t.status.endsWith('Retrying') || t.status === 'AsyncCommitting' || t.status.endsWith('Rollbacking'))) {
    const verb = t.paused ? 'resume' : 'pause';
    actions.push(h('button', { testid: `action-${verb}`, on: { click: () => txnAction(t, verb) } }, t.paused ? 'Resume retries' : 'Pause retries'));
  }
  draw(
    h('h1', {}, `Transaction ${t.xid} `, badge(t.status), t.paused ? ' (retries paused)' : ''),
    h('p', { class: 'muted' }, `name ${t.name || '-'} · version ${t.version} · timeout ${t.timeout_ms} ms · begun ${time(t.begin_ms)} · updated ${time(t.updated_ms)}`),
    t.failure ? h('p', { class: 'warning', testid: 'failure' }, `Branch ${t.failure.branch_id} on ${t.failure.resource_id}: ${t.failure.reason} `,
      link(`#/txn/${encodeURIComponent(t.xid)}/branch/${failedBranch}`, 'See the rows', 'tab-dirty')) : null,
    h('div', { class: 'actions' }, actions),
    h('h2', {}, 'Timeline'), timeline(events.events),
    h('h2', {}, 'Branches'),
    (t.branches || []).length ? table(['Branch', 'Resource', 'Status', 'Locks', 'Error', ''], t.branches.map((b) => h('tr', { testid: `branch-${b.branch_id}` },
      h('td', {}, b.branch_id), h('td', {}, b.resource_id), h('td', {}, badge(b.status)), h('td', {}, b.lock_keys.length),
      h('td', {}, b.error ? b.error.reason.slice(0, 120) : '-'),
      h('td', {}, link(`#/txn/${encodeURIComponent(t.xid)}/branch/${b.branch_id}`, 'rows', `rows-${b.branch_id}`))))) : h('p', { class: 'muted' }, 'None left.'),
    h('h2', {}, 'Events'),
    table(['Version', 'Time', 'Event', 'Detail'], events.events.map((e) => h('tr', { testid: `event-${e.type}` },
      h('td', {}, e.version), h('td', {}, time(e.at_ms)), h('td', {}, e.type), h('td', { class: 'mono' }, eventDetail(e)))), 'events'));
}

function eventDetail(e) {
  const skip = new Set(['version', 'at_ms', 'type', 'detail']);
  return Object.entries(e).filter(([k, v]) => !skip.has(k) && v !== null && v !== '').map(([k, v]) => `${k}=${typeof v === 'object' ? JSON.stringify(v) : v}`).join(' ');
}

// Branches as lanes on a time axis: registrations, phase-2 attempts (retries with their
// count), failures and operator actions as marks.
function timeline(events) {
  const NS = 'http://www.w3.org/2000/svg';
  const s = (tag, attrs, text) => {
    const el = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
    if (text !== undefined) el.textContent = text;
    return el;
  };
  const lanes = ['transaction'];
  for (const e of events) if (e.branch_id !== undefined && e.branch_id !== null && !lanes.includes(`branch ${e.branch_id}`)) lanes.push(`branch ${e.branch_id}`);
  const t0 = events.length ? events[0].at_ms : 0;
  const t1 = events.length ? Math.max(...events.map((e) => e.at_ms), t0 + 1) : 1;
  const width = 1000, left = 200, right = 20, laneH = 34, top = 24;
  const height = top + lanes.length * laneH + 10;
  const x = (ms) => left + ((ms - t0) / (t1 - t0)) * (width - left - right);
  const svg = s('svg', { class: 'timeline', viewBox: `0 0 ${width} ${height}`, 'data-testid': 'timeline' });
  svg.append(s('text', { x: left, y: 14 }, '0 ms'), s('text', { x: width - right - 60, y: 14 }, `${t1 - t0} ms`));
  lanes.forEach((lane, i) => {
    const y = top + i * laneH + laneH / 2;
    svg.append(s('text', { x: 6, y: y + 4 }, lane), s('line', { x1: left, x2: width - right, y1: y, y2: y, stroke: '#d6dbe1' }));
  });
  const colour = { done: '#067647', retry: '#b54708' };
  for (const e of events) {
    const lane = e.branch_id !== undefined && e.branch_id !== null ? lanes.indexOf(`branch ${e.branch_id}`) : 0;
    const y = top + lane * laneH + laneH / 2;
    const cx = x(e.at_ms);
    const title = s('title', {}, `${e.type} at +${e.at_ms - t0} ms (version ${e.version}) ${eventDetail(e)}`);
    let mark;
    if (e.type === 'operator_action') {
      mark = s('path', { d: `M ${cx} ${y - 8} L ${cx + 8} ${y} L ${cx} ${y + 8} L ${cx - 8} ${y} Z`, fill: '#175cd3', 'data-testid': 'mark-operator' });
    } else if (e.type === 'phase_two_failed' || e.type === 'registration_refused') {
      mark = s('rect', { x: cx - 6, y: y - 6, width: 12, height: 12, fill: '#b42318', 'data-testid': `mark-${e.type}` });
    } else if (e.type === 'lock_waited') {
      mark = s('rect', { x: x(e.at_ms - e.waited_ms), y: y - 3, width: Math.max(2, cx - x(e.at_ms - e.waited_ms)), height: 6, fill: '#98a2b3' });
    } else if (e.type === 'decided' || e.type === 'finished' || e.type === 'begun' || e.type === 'restored') {
      mark = s('line', { x1: cx, x2: cx, y1: top, y2: height - 10, stroke: e.type === 'decided' ? '#1b1f24' : '#98a2b3', 'stroke-dasharray': e.type === 'decided' ? '' : '3 3' });
      svg.append(s('text', { x: cx + 3, y: height - 12 }, e.type === 'decided' ? `${e.decision} (${e.by})` : e.type));
    } else {
      mark = s('circle', { cx, cy: y, r: 6, fill: colour[e.result] || '#344054', 'data-testid': `mark-${e.type}` });
      if (e.attempts > 1) svg.append(s('text', { x: cx + 8, y: y - 8 }, `×${e.attempts}`));
    }
    mark.append(title);
    svg.append(mark);
  }
  return svg;
}

// ---- the dirty-rollback diff ---------------------------------------------------------

const pkText = (row) => Object.entries(row.primary_key).map(([k, v]) => `${k}=${v}`).join(',');

function valueCell(c, image, hex, testid) {
  const raw = c[image];
  const display = c.display ? c.display[image] : raw;
  const td = h('td', { class: 'value', testid });
  if (raw && typeof raw === 'object' && raw.redacted) td.append(h('span', { class: 'muted' }, 'hidden'));
  else if (raw === null) td.append(h('span', { class: 'value-null' }, 'NULL'));
  else if (!hex && typeof display === 'string') td.append(display === '' ? h('span', { class: 'muted' }, "''") : display);
  else td.append(h('span', { class: 'mono' }, c.encoding === 'hex' || c.encoding === 'char' ? `0x${raw}` : raw));
  return td;
}

async function dirtyPage(xid, branch, draw) {
  const base = `/v1/transactions/${encodeURIComponent(xid)}/branches/${branch}`;
  const [seen, events] = await Promise.all([get(`${base}/dirty`), get(`/v1/transactions/${encodeURIComponent(xid)}/events`)]);
  // The outside writer wrote between the branch's registration and the failed rollback.
  const registered = events.events.find((e) => e.type === 'branch_registered' && String(e.branch_id) === String(branch));
  const detected = events.events.find((e) => e.type === 'phase_two_failed' && String(e.branch_id) === String(branch));
  const stamp = (ms) => new Date(ms).toISOString().replace('T', ' ').replace(/\.\d+Z$/, '');
  const binlog = registered && detected ? h('p', { class: 'muted', testid: 'binlog-hint' },
    'Find the outside writer in the binary log (UTC): ',
    h('code', {}, `mysqlbinlog --start-datetime='${stamp(registered.at_ms - 1000)}' --stop-datetime='${stamp(detected.at_ms + 1000)}'`)) : null;
  let hex = false, stale = false;
  const selected = new Set();
  const rowsBox = h('div', { testid: 'rows' });
  const status = h('div', { testid: 'status-line' });
  const drawRows = () => {
    rowsBox.replaceChildren(...seen.rows.filter((r) => r.state !== 'clean' || showClean.checked).map((r) => {
      const pk = pkText(r);
      const box = me.may.act ? h('input', { type: 'checkbox', testid: `select:${pk}`, checked: selected.has(r.row), on: { change: (ev) => {
        if (ev.target.checked) selected.add(r.row); else selected.delete(r.row);
        updateButtons();
      } } }) : null;
      return h('div', { class: 'row-block', testid: `row:${pk}` },
        h('h3', {}, box, `${r.schema}.${r.table} ${pk}`, badge(r.state), typeof r.digest === 'string' ? h('span', { class: 'muted mono', title: r.digest }, `digest ${r.digest.slice(0, 12)}`) : null),
        table(['Column', 'Type', 'Before', 'After', 'Current'], r.columns.map((c) => {
          const current = valueCell(c, 'current', hex, `cell:${pk}:${c.column}:current`);
          if (c.differs) current.classList.add('differs-from-after');
          return h('tr', {}, h('td', {}, c.column), h('td', { class: 'muted' }, c.type || c.encoding),
            valueCell(c, 'before', hex, `cell:${pk}:${c.column}:before`), valueCell(c, 'after', hex, `cell:${pk}:${c.column}:after`), current);
        })));
    }));
  };
  const showClean = h('input', { type: 'checkbox', testid: 'show-clean', on: { change: drawRows } });
  const hexToggle = h('button', { testid: 'toggle-hex', on: { click: () => { hex = !hex; hexToggle.textContent = hex ? 'Show text' : 'Show raw hex'; drawRows(); } } }, 'Show raw hex');
  const buttons = [];
  const actionButton = (label, testid, cls, fn) => { const b = h('button', { class: cls, testid, on: { click: fn } }, label); buttons.push(b); return b; };
  const updateButtons = () => {
    for (const b of buttons) {
      const needsRows = b.dataset.testid === 'action-accept' || b.dataset.testid === 'action-restore';
      b.disabled = stale || (needsRows && selected.size === 0);
    }
  };
  const rowsBody = (extra) => ({
    expect_version: seen.version,
    rows: seen.rows.filter((r) => selected.has(r.row)).map((r) => ({ row: r.row, digest: r.digest })),
    ...extra,
  });
  const t = { xid, version: seen.version, status: seen.status };
  const actions = me.may.act ? h('div', { class: 'actions', testid: 'action-bar' },
    actionButton('Accept current values', 'action-accept', 'primary', () => repairDialog(xid, `${base}/accept`, 'accept', rowsBody({}), afterAction)),
    actionButton('Restore before image', 'action-restore', 'danger', () => repairDialog(xid, `${base}/restore`, 'restore', rowsBody({}), afterAction)),
    actionButton('Retry rollback', 'action-retry', '', () => txnAction(t, 'retry')),
    actionButton('Mark resolved', 'action-resolve', 'danger', () => txnAction(t, 'resolve'))) : null;
  const afterAction = (e) => {
    if (e && e.code === 'precondition_failed') {
      stale = true;
      status.replaceChildren(h('p', { class: 'error', testid: 'stale' }, 'The rows or the transaction changed since you looked. Refresh before acting.'));
      updateButtons();
    } else if (!e) { render(); }
  };
  draw(
    h('h1', {}, `Rows of branch ${branch} of `, xidLink(xid)),
    h('p', { class: 'muted' }, `${seen.resource_id} · ${seen.row_count} rows, ${seen.dirty_rows} changed outside the transaction · transaction ${seen.status}, version ${seen.version}`),
    seen.values_redacted ? h('p', { class: 'warning', testid: 'redacted' }, 'Values are hidden for your role.') : null,
    binlog,
    h('div', { class: 'actions' }, hexToggle, h('label', {}, showClean, ' show rows the rollback would restore'),
      h('button', { testid: 'refresh', on: { click: render } }, 'Refresh current values')),
    status, actions, rowsBox);
  drawRows();
  updateButtons();
}

// ---- actions: dry run, reason, confirmation -------------------------------------------

const WARNINGS = {
  accept: 'These rows keep their current values; the global transaction\'s change to them is superseded. Their before image is kept only in the audit.',
  restore: 'This overwrites the changes made outside the global transaction after it wrote these rows.',
  resolve: 'Ferrata will stop tracking this transaction and release its rows. Make sure the rows are correct.',
  retry: 'The data must now equal the after image: the rollback restores the before image.',
};

// A dialog that shows the dry run, asks for a reason (and the typed XID for what overwrites
// or forgets), then acts.
async function openDialog(xid, title, verb, dry, act, done) {
  const reason = h('textarea', { testid: 'reason', placeholder: 'Why (goes into the audit trail)' });
  const typed = verb === 'restore' || verb === 'resolve' ? h('input', { testid: 'confirm-xid', placeholder: `type ${xid} to confirm` }) : null;
  const confirm = h('button', { class: 'primary', testid: 'confirm', disabled: true }, title);
  const result = h('div', { testid: 'result' });
  const check = () => { confirm.disabled = !reason.value.trim() || (typed && typed.value.trim() !== xid); };
  reason.addEventListener('input', check);
  if (typed) typed.addEventListener('input', check);
  let dryView;
  try {
    dryView = dry ? h('pre', { testid: 'dry-run' }, JSON.stringify(await dry(), null, 2)) : h('p', { class: 'muted' }, 'No dry run for this action.');
  } catch (e) {
    dryView = h('p', { class: 'error', testid: 'dry-run-error' }, `${e.code || ''} ${e.message}`);
    if (e.code === 'precondition_failed') { done(e); }
  }
  confirm.addEventListener('click', async () => {
    confirm.disabled = true;
    try {
      const r = await act(reason.value.trim());
      result.replaceChildren(h('p', { class: 'ok', testid: 'result-ok' }, `Done${r.audit_id ? ` (audit record ${r.audit_id})` : ''}.`));
      setTimeout(() => { dialog.close(); done(null); }, 600);
    } catch (e) {
      result.replaceChildren(h('p', { class: 'error', testid: 'result-error' }, `${e.code || ''}: ${e.message}`));
      done(e);
    }
  });
  dialog.replaceChildren(h('h2', {}, `${title} — ${xid}`), h('p', { class: 'warning' }, WARNINGS[verb] || ''),
    h('h3', {}, 'What would happen'), dryView, reason, typed, h('div', { class: 'actions' }, confirm,
      h('button', { testid: 'cancel', on: { click: () => dialog.close() } }, 'Cancel')), result);
  dialog.showModal();
}

function repairDialog(xid, path, verb, body, done) {
  const title = verb === 'accept' ? 'Accept current values' : 'Restore before image';
  return openDialog(xid, title, verb, () => post(path, { ...body, reason: 'dry run', dry_run: true }),
    (reason) => post(path, { ...body, reason }), done);
}

function txnAction(t, verb) {
  const path = `/v1/transactions/${encodeURIComponent(t.xid)}/${verb}`;
  const titles = { retry: 'Retry', resolve: 'Mark resolved', pause: 'Pause retries', resume: 'Resume retries' };
  const dry = verb === 'retry' || verb === 'resolve' ? () => post(path, { reason: 'dry run', expect_version: t.version, dry_run: true }) : null;
  return openDialog(t.xid, titles[verb], verb, dry, (reason) => post(path, { reason, expect_version: t.version }), (e) => { if (!e) render(); });
}

// ---- locks, audit, proxies, tokens ---------------------------------------------------

// Who waits for whom, followed from a waiter: `A → B → C` (A waits for B, which waits for C).
function waitChains(locks) {
  const waitsFor = new Map();
  for (const l of locks) for (const w of l.waiters) {
    if (!waitsFor.has(w)) waitsFor.set(w, new Set());
    waitsFor.get(w).add(l.holder);
  }
  const chain = (start) => {
    const seen = [start];
    let at = start;
    while (waitsFor.has(at) && seen.length < 10) {
      at = [...waitsFor.get(at)][0];
      if (seen.includes(at)) { seen.push(at); break; }
      seen.push(at);
    }
    return seen;
  };
  return [...waitsFor.keys()].map(chain).filter((c) => c.length > 1);
}

async function locksPage(draw) {
  const [locks, deadlocks] = await Promise.all([get('/v1/locks?limit=10000'), get('/v1/deadlocks')]);
  const chains = waitChains(locks.locks);
  draw(h('h1', {}, 'Locks'),
    table(['Table', 'Key', 'Holder', 'Held', 'Waiters'], locks.locks.map((l) => h('tr', {},
      h('td', {}, `${l.key.schema}.${l.key.table}`), h('td', { class: 'mono' }, JSON.stringify(l.key.pk)), h('td', {}, xidLink(l.holder)),
      h('td', {}, ago(l.since_ms)), h('td', {}, l.waiters.map((w) => [xidLink(w), ' '])))), 'locks'),
    h('h2', {}, 'Wait-for chains'),
    chains.length ? h('ul', { testid: 'wait-chains' }, chains.map((c) => h('li', {}, c.map((x, i) => [i ? ' → ' : '', xidLink(x)]))))
      : h('p', { class: 'muted' }, 'Nobody waits.'),
    h('h2', {}, 'Deadlocks'),
    table(['When', 'Cycle', 'Gave way', 'Table'], deadlocks.deadlocks.slice().reverse().map((d) => h('tr', {},
      h('td', {}, `${ago(d.at_ms)} ago`), h('td', {}, d.cycle.join(' → ')), h('td', {}, d.victim), h('td', {}, `${d.schema}.${d.table}`))), 'deadlocks'));
}

async function auditPage(params, draw) {
  const q = params.toString();
  const [records, verify] = await Promise.all([get(`/v1/audit?limit=1000${q ? `&${q}` : ''}`), get('/v1/audit/verify')]);
  draw(h('h1', {}, 'Audit'),
    h('p', { testid: 'audit-verify', class: verify.ok ? 'ok' : 'error' }, verify.ok ? `Chain intact: ${verify.records} records.` : `Chain broken at record ${verify.broken_at}: ${verify.problem}`),
    table(['Id', 'When', 'Actor', 'Role', 'Action', 'XID', 'Reason', 'Effect'], records.records.map((r) => h('tr', { testid: `audit-${r.id}` },
      h('td', {}, r.id), h('td', {}, time(r.at_ms)), h('td', {}, r.actor), h('td', {}, r.role), h('td', {}, r.action),
      h('td', {}, r.xid ? xidLink(r.xid) : '-'), h('td', {}, r.reason),
      h('td', {}, h('details', {}, h('summary', {}, 'JSON'), h('pre', {}, JSON.stringify({ origin: r.origin, precondition: r.precondition, target: r.target, effect: r.effect }, null, 2)))))), 'audit'));
}

async function proxiesPage(draw) {
  const rms = await get('/v1/resource-managers');
  draw(h('h1', {}, 'Proxies'),
    table(['Proxy', 'Resources', 'Attached', 'Last heartbeat', 'Guard updates acked'], rms.resource_managers.map((r) => h('tr', {},
      h('td', {}, r.rm_id), h('td', {}, r.resources.join(', ')), h('td', {}, `${Math.round(r.attached_ms_ago / 1000)}s ago`),
      h('td', { class: r.last_heartbeat_ms_ago > 2 * rms.heartbeat_interval_ms ? 'error' : '' }, `${r.last_heartbeat_ms_ago} ms ago`),
      h('td', {}, r.guard_updates_acked))), 'proxies'));
}

async function tokensPage(draw) {
  const tokens = await get('/v1/tokens');
  const name = h('input', { testid: 'token-name', placeholder: 'name' });
  const role = h('select', { testid: 'token-role' }, ['viewer', 'operator', 'admin', 'application', 'proxy'].map((r) => h('option', { value: r }, r)));
  const reason = h('input', { testid: 'token-reason', placeholder: 'reason' });
  const out = h('div', { testid: 'token-result' });
  const create = h('button', { class: 'primary', testid: 'token-create', on: { click: async () => {
    try {
      const t = await post('/v1/tokens', { name: name.value.trim(), role: role.value, reason: reason.value.trim() });
      out.replaceChildren(h('p', {}, 'Secret, shown this once: ', h('code', { testid: 'new-secret' }, t.secret)));
    } catch (e) { out.replaceChildren(failure(e)); }
  } } }, 'Create');
  draw(h('h1', {}, 'Tokens'),
    table(['Name', 'Role', 'Created', 'By', 'Expires', 'Last used', ''], tokens.tokens.map((t) => h('tr', { testid: `token-${t.name}` },
      h('td', {}, t.name), h('td', {}, t.role), h('td', {}, time(t.created_ms)), h('td', {}, t.created_by),
      h('td', {}, t.expires_ms ? time(t.expires_ms) : 'never'), h('td', {}, t.last_used_ms ? `${ago(t.last_used_ms)} ago` : 'never'),
      h('td', {}, h('button', { testid: `revoke-${t.name}`, on: { click: async () => {
        const why = prompt(`Why revoke ${t.name}?`);
        if (why) { await api('DELETE', `/v1/tokens/${encodeURIComponent(t.name)}`, { reason: why }); render(); }
      } } }, 'Revoke'))))),
    h('h2', {}, 'New token'), h('div', { class: 'filters' }, name, role, reason, create), out);
}

start();
