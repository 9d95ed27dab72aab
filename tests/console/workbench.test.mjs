// The console in a real headless browser (Debian's chromium via playwright-core): a DBA
// finds a failed transaction from the attention page, reads the diff, accepts one row and
// restores another, and the database and the audit show it; a stale view is refused; a
// viewer sees no action and is refused by the API; changes need the CSRF header; the page
// fetches nothing from anywhere but the coordinator.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, writeFileSync } from 'node:fs';
import { chromium } from 'playwright-core';
import { startFixture } from './fixture.mjs';

let fx, browser;
const artifacts = new URL('./artifacts/', import.meta.url).pathname;

before(async () => {
  fx = await startFixture();
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM_BIN || '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage'],
  });
});

after(async () => {
  await browser?.close();
  await fx?.stop();
});

// A logged-in page; every request it makes is recorded. On failure: screenshot and HTML.
async function session(t, token, body) {
  const context = await browser.newContext({ viewport: { width: 1400, height: 1000 } });
  const page = await context.newPage();
  const requests = [];
  page.on('request', (r) => requests.push(r.url()));
  page.setDefaultTimeout(20_000);
  try {
    await page.goto(`${fx.url}/ui/`);
    await page.getByTestId('token').fill(token);
    await page.getByTestId('login').click();
    await page.getByTestId('nav-attention').waitFor();
    await body(page, requests);
  } catch (e) {
    mkdirSync(artifacts, { recursive: true });
    const name = t.name.replace(/\W+/g, '-');
    await page.screenshot({ path: `${artifacts}${name}.png`, fullPage: true }).catch(() => {});
    writeFileSync(`${artifacts}${name}.html`, await page.content().catch(() => ''));
    throw e;
  } finally {
    await context.close();
  }
}

test('an operator accepts one row and restores another from the diff, then retries the rollback', async (t) => {
  await session(t, fx.operator_token, async (page, requests) => {
    assert.equal(await page.getByTestId('me').textContent(), 'olga (operator)');
    assert.equal(await page.getByTestId('card-failed').locator('.n').textContent(), '1');
    await page.getByTestId(`txn-${fx.xid}`).click();
    await page.getByTestId('timeline').waitFor();
    assert.equal(await page.getByTestId('event-phase_two_failed').count(), 1);
    mkdirSync(artifacts, { recursive: true });
    await page.screenshot({ path: `${artifacts}transaction.png`, fullPage: true });
    await page.getByTestId('tab-dirty').click();

    const cell = (pk, column, image) => page.getByTestId(`cell:${pk}:${column}:${image}`);
    assert.equal(await cell('id=1', 'note', 'current').textContent(), 'x1');
    assert.equal(await cell('id=1', 'note', 'before').textContent(), 'a');
    assert.equal(await cell('id=1', 'note', 'after').textContent(), 'a!');
    assert.match(await cell('id=1', 'note', 'current').getAttribute('class'), /differs-from-after/);
    assert.equal(await cell('id=1', 'amount', 'before').textContent(), '1.00', 'DECIMAL keeps its scale');
    assert.doesNotMatch(await cell('id=1', 'amount', 'current').getAttribute('class'), /differs-from-after/);
    await page.getByTestId('toggle-hex').click();
    assert.equal(await cell('id=1', 'note', 'current').textContent(), '0x7831', 'raw bytes on demand');
    await page.getByTestId('toggle-hex').click();
    assert.equal(await page.getByTestId('row:id=3').count(), 0, 'rows the rollback restores are folded away');
    assert.match(await page.getByTestId('binlog-hint').textContent(), /mysqlbinlog --start-datetime='\d{4}-/);
    await page.screenshot({ path: `${artifacts}dirty-diff.png`, fullPage: true });

    // Accept row 1: a dry run first, a reason required.
    await page.getByTestId('select:id=1').check();
    await page.getByTestId('action-accept').click();
    await page.getByTestId('dry-run').waitFor();
    assert.match(await page.getByTestId('dry-run').textContent(), /"dry_run": true/);
    assert.equal(await page.getByTestId('confirm').isDisabled(), true, 'no reason, no action');
    await page.getByTestId('reason').fill('support fixed note 1 by hand, ticket 7: keep it');
    await page.getByTestId('confirm').click();
    await page.getByTestId('result-ok').waitFor();
    await page.getByTestId('row:id=1').waitFor({ state: 'detached' });
    let audit = await fx.check('audit');
    assert.deepEqual(audit.map((r) => [r[1], r[2]]), [['accept', 'olga']]);
    assert.deepEqual((await fx.check('table'))[0], [1, 'x1', '2.00'], 'accepted: kept as it is');

    // Restore row 2: the XID must be typed.
    await page.getByTestId('select:id=2').check();
    await page.getByTestId('action-restore').click();
    await page.getByTestId('reason').fill('the outside change to row 2 was a mistake, ticket 8');
    assert.equal(await page.getByTestId('confirm').isDisabled(), true, 'the XID is not typed yet');
    await page.getByTestId('confirm-xid').fill(fx.xid);
    await page.getByTestId('confirm').click();
    await page.getByTestId('result-ok').waitFor();
    assert.deepEqual((await fx.check('table'))[1], [2, 'b', '2.00'], 'restored: the before image');
    audit = await fx.check('audit');
    assert.deepEqual(audit.map((r) => r[1]), ['accept', 'restore']);
    assert.match(audit[1][4], /"x2"|7832/, 'the audit row keeps the overwritten value');

    // Nothing dirty is left: the rollback is retried and finishes.
    await page.getByTestId('row:id=2').waitFor({ state: 'detached' });
    await page.getByTestId('action-retry').click();
    await page.getByTestId('dry-run').waitFor();
    assert.match(await page.getByTestId('dry-run').textContent(), /"still_dirty": false/);
    await page.getByTestId('reason').fill('rows settled');
    await page.getByTestId('confirm').click();
    await page.getByTestId('result-ok').waitFor();
    assert.deepEqual((await fx.check('table'))[2], [3, 'c', '3.00']);
    assert.equal(await fx.check('undo'), 0);

    // The audit page shows who did what and why; the chain is intact.
    await page.getByTestId('nav-audit').click();
    await page.getByTestId('audit-verify').waitFor();
    assert.match(await page.getByTestId('audit-verify').textContent(), /Chain intact/);
    const rows = await page.getByTestId('audit').locator('tbody tr').allTextContents();
    assert.ok(rows.some((r) => r.includes('olga') && r.includes('dirty.accept') && r.includes('ticket 7')), rows.join('\n'));
    assert.ok(rows.some((r) => r.includes('dirty.restore') && r.includes('ticket 8')), rows.join('\n'));

    const foreign = requests.filter((u) => !u.startsWith(fx.url));
    assert.deepEqual(foreign, [], 'the console fetches nothing from anywhere else');
  });
});

test('a view that went stale is refused until it is refreshed', async (t) => {
  const { xid, branch } = await fx.check('dirty');
  await session(t, fx.operator_token, async (page) => {
    await page.goto(`${fx.url}/ui/#/txn/${xid}/branch/${branch}`);
    await page.getByTestId('row:id=1').waitFor();
    assert.equal(await fx.check('change 1 zz'), 'changed');
    await page.getByTestId('select:id=1').check();
    await page.getByTestId('action-accept').click();
    await page.getByTestId('dry-run-error').waitFor();
    assert.match(await page.getByTestId('dry-run-error').textContent(), /precondition_failed/);
    await page.getByTestId('cancel').click();
    await page.getByTestId('stale').waitFor();
    assert.equal(await page.getByTestId('action-accept').isDisabled(), true);
    await page.getByTestId('refresh').click();
    await page.getByTestId('cell:id=1:note:current').waitFor();
    assert.equal(await page.getByTestId('cell:id=1:note:current').textContent(), 'zz');
    await page.getByTestId('select:id=1').check();
    assert.equal(await page.getByTestId('action-accept').isDisabled(), false);
    // Changes from a console session need its CSRF header.
    const status = await page.evaluate(async (url) => (await fetch(url, { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: '{"reason":"x"}' })).status,
      `/v1/transactions/${xid}/retry`);
    assert.equal(status, 403);
  });
});

test('a viewer sees no actions and no values, and the API refuses its changes', async (t) => {
  await session(t, fx.viewer_token, async (page) => {
    const list = await page.evaluate(async () => (await fetch('/v1/transactions?status=RollbackFailed')).json());
    const { xid, failure } = list.transactions[0];
    await page.goto(`${fx.url}/ui/#/txn/${xid}/branch/${failure.branch_id}`);
    await page.getByTestId('redacted').waitFor();
    assert.equal(await page.getByTestId('action-bar').count(), 0);
    assert.equal(await page.locator('[data-testid^="select:"]').count(), 0);
    assert.equal(await page.getByTestId('cell:id=1:note:current').textContent(), 'hidden');
    const refused = await page.evaluate(async (path) => {
      const { csrf } = await (await fetch('/v1/session')).json();
      const r = await fetch(path, { method: 'POST', headers: { 'Content-Type': 'application/json', 'X-CSRF-Token': csrf },
        body: JSON.stringify({ reason: 'x', all: true }) });
      return [r.status, (await r.json()).code];
    }, `/v1/transactions/${xid}/branches/${failure.branch_id}/accept`);
    assert.deepEqual(refused, [403, 'forbidden']);
    assert.equal(await page.getByTestId('nav-tokens').isHidden(), true);
  });
});
