// Starts the Rust fixture (tests/bin/console_fixture.rs): MariaDB, a coordinator, a proxy,
// two tokens and a dirty rollback; `check(command)` asks it about the database.

import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';

export async function startFixture() {
  const bin = process.env.FIXTURE_BIN;
  if (!bin) throw new Error('FIXTURE_BIN names the fixture binary (scripts/console-tests.sh sets it)');
  const child = spawn(bin, [], { stdio: ['pipe', 'pipe', 'inherit'] });
  const lines = createInterface({ input: child.stdout });
  const waiting = [];
  const queued = [];
  lines.on('line', (line) => {
    const next = waiting.shift();
    if (next) next(line); else queued.push(line);
  });
  const exited = new Promise((resolve) => child.on('exit', (code) => resolve(code)));
  const nextLine = () => new Promise((resolve, reject) => {
    if (queued.length) return resolve(queued.shift());
    waiting.push(resolve);
    exited.then((code) => reject(new Error(`the fixture exited (${code})`)));
  });
  const first = JSON.parse(await nextLine());
  return {
    ...first,
    async check(command) {
      child.stdin.write(`${command}\n`);
      return JSON.parse(await nextLine());
    },
    async stop() {
      child.stdin.end();
      await exited;
    },
  };
}
