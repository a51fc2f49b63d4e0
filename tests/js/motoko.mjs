// Compiles a small Motoko actor with the npm build of moc (package `motoko`, offline) and writes the wasm to
// the path given as the first argument. Used by the Rust test `motoko_canister_runs`.
// The output is a wasm64 module with enhanced orthogonal persistence (real-clients.md section 6).
// The actor prints (for canister logs) and can trap on purpose (`boom`).
import { writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';

const outputPath = process.argv[2];
if (!outputPath) {
  console.error('usage: node motoko.mjs OUTPUT.wasm');
  process.exit(2);
}

const require = createRequire(import.meta.url);
const mo = require('motoko');

const source = `import Prim "mo:⛔";
persistent actor Counter {
  var count : Nat64 = 0;
  public func inc() : async Nat64 {
    count += 1;
    Prim.debugPrint("inc " # debug_show count);
    count
  };
  public query func get() : async Nat64 { count };
  public func boom() : async () { Prim.trap("motoko boom") };
};
`;

mo.write('Counter.mo', source);
const result = mo.wasm('Counter.mo', 'ic');
if (!result || !result.wasm || result.wasm.length === 0) {
  console.error('moc produced no wasm', result);
  process.exit(1);
}
writeFileSync(outputPath, result.wasm);
console.log(`wrote ${result.wasm.length} bytes to ${outputPath}`);
