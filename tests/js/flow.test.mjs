// End-to-end flow with the unmodified @icp-sdk/core client against an openic node.
//
// Run by the Rust test `js_agent_flow` (tests/tests/e2e.rs), which starts a node, deploys the `counter` test
// canister and sets:
//   OPENIC_URL           the node's URL, e.g. http://127.0.0.1:PORT
//   CANISTER_ID          the textual id of a freshly installed `counter` canister (counter starts at 0)
//   EXPECTED_MODULE_HASH (optional) hex SHA-256 of the installed module
// Verification stays at the client defaults: the root key is fetched from /api/v2/status, certificates are
// BLS-verified and query signatures are checked.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Actor, Certificate, CanisterStatus, HttpAgent, LookupPathStatus } from '@icp-sdk/core/agent';
import { Principal } from '@icp-sdk/core/principal';

const url = process.env.OPENIC_URL;
const canisterIdText = process.env.CANISTER_ID;
if (!url || !canisterIdText) {
  throw new Error('flow.test.mjs needs OPENIC_URL and CANISTER_ID in the environment (set by the Rust test js_agent_flow)');
}
const canisterId = Principal.fromText(canisterIdText);

/** Hand-written Candid interface of the `counter` test canister (the part this test uses). */
const counterIdl = ({ IDL }) =>
  IDL.Service({
    inc: IDL.Func([], [IDL.Nat64], []),
    get: IDL.Func([], [IDL.Nat64], ['query']),
    whoami: IDL.Func([], [IDL.Principal], ['query']),
  });

/** Unsigned LEB128 -> bigint (the encoding of `/time` in the state tree). */
function decodeLeb128(bytes) {
  let value = 0n;
  let shift = 0n;
  for (const byte of bytes) {
    value |= BigInt(byte & 0x7f) << shift;
    if ((byte & 0x80) === 0) return value;
    shift += 7n;
  }
  throw new Error(`unterminated LEB128: ${Buffer.from(bytes).toString('hex')}`);
}

// OPENIC_URLS (optional, comma-separated): the replicas of a subnet; each agent talks to the next
// one, so the tests' calls are spread over the replicas.
const urls = (process.env.OPENIC_URLS || url).split(',');
let nextUrl = 0;

async function makeAgent() {
  const host = urls[nextUrl++ % urls.length];
  // shouldFetchRootKey: trust the node's root key (a local replica), with every other check at its default.
  return HttpAgent.create({ host, shouldFetchRootKey: true });
}

const TIME_SKEW_ALLOWED_MS = 5 * 60 * 1000;

test('update inc and query get through an Actor', async () => {
  const agent = await makeAgent();
  const counter = Actor.createActor(counterIdl, { agent, canisterId });
  assert.equal(await counter.get(), 0n, 'a fresh counter starts at 0');
  assert.equal(await counter.inc(), 1n);
  assert.equal(await counter.inc(), 2n);
  assert.equal(await counter.get(), 2n, 'the query sees both certified updates');
  const me = await counter.whoami();
  assert.equal(me.toText(), Principal.anonymous().toText(), 'HttpAgent without an identity calls anonymously');
});

test('read_state /time is certified and close to now', async () => {
  const agent = await makeAgent();
  const timePath = [new TextEncoder().encode('time')];
  const response = await agent.readState(canisterId, { paths: [timePath] });
  const certificate = await Certificate.create({
    certificate: response.certificate,
    rootKey: agent.rootKey,
    principal: { canisterId },
  });
  const lookup = certificate.lookup_path(timePath);
  assert.equal(lookup.status, LookupPathStatus.Found, '/time must be in every certificate');
  const timeMs = Number(decodeLeb128(lookup.value) / 1_000_000n);
  assert.ok(Math.abs(Date.now() - timeMs) < TIME_SKEW_ALLOWED_MS, `certified time ${new Date(timeMs).toISOString()} is far from now`);
});

test('CanisterStatus reads time, controllers and module hash', async () => {
  const agent = await makeAgent();
  const status = await CanisterStatus.request({ canisterId, agent, paths: ['time', 'controllers', 'module_hash'] });
  const time = status.get('time');
  assert.ok(time instanceof Date, `time should decode to a Date, got ${time}`);
  assert.ok(Math.abs(Date.now() - time.getTime()) < TIME_SKEW_ALLOWED_MS);
  const controllers = status.get('controllers');
  assert.ok(Array.isArray(controllers) && controllers.length >= 1, `controllers: ${controllers}`);
  const moduleHash = status.get('module_hash');
  assert.equal(typeof moduleHash, 'string', `module_hash: ${moduleHash}`);
  if (process.env.EXPECTED_MODULE_HASH) {
    assert.equal(moduleHash, process.env.EXPECTED_MODULE_HASH.toLowerCase());
  }
});

test('syncTime against the node', async () => {
  const agent = await makeAgent();
  await agent.syncTime(canisterId);
  const counter = Actor.createActor(counterIdl, { agent, canisterId });
  // Another replica of a subnet may be a moment behind the one that took the updates.
  let value = await counter.get();
  for (let tries = 0; value < 2n && tries < 100; tries++) {
    await new Promise((resolve) => setTimeout(resolve, 50));
    value = await counter.get();
  }
  assert.ok(value >= 2n, `the counter is ${value}`);
});
