# Writes the http_envelope, request_id, management_args and block_log seeds (hand-encoded CBOR and
# Candid). Run from fuzz/seeds: python3 make_cbor_seeds.py
import struct
def head(major, n):
    if n < 24: return bytes([major<<5 | n])
    if n < 256: return bytes([major<<5 | 24, n])
    if n < 65536: return bytes([major<<5 | 25]) + struct.pack('>H', n)
    if n < 2**32: return bytes([major<<5 | 26]) + struct.pack('>I', n)
    return bytes([major<<5 | 27]) + struct.pack('>Q', n)
def enc(v):
    if isinstance(v, bool): return b'\xf5' if v else b'\xf4'
    if isinstance(v, int): return head(0, v) if v >= 0 else head(1, -1-v)
    if isinstance(v, bytes): return head(2, len(v)) + v
    if isinstance(v, str): b=v.encode(); return head(3, len(b)) + b
    if isinstance(v, list): return head(4, len(v)) + b''.join(enc(x) for x in v)
    if isinstance(v, dict): return head(5, len(v)) + b''.join(enc(k)+enc(x) for k,x in v.items())
    if isinstance(v, tuple) and v[0]=='tag': return head(6, v[1]) + enc(v[2])
    raise TypeError(v)
NOW = 1_700_000_000_000_000_000
EXP = NOW + 60 * 10**9
ANON = b'\x04'
CAN0 = bytes([0,0,0,0,0,0,0,0,1,1])
MGMT = b''
DIDL = b'DIDL\x00\x00'
def env(content): return enc(('tag', 55799, {'content': content}))
call = lambda cid, m, arg=DIDL: {'request_type':'call','canister_id':cid,'method_name':m,'arg':arg,'sender':ANON,'ingress_expiry':EXP,'nonce':b'\x01\x02'}
query = lambda cid, m, arg=DIDL: {'request_type':'query','canister_id':cid,'method_name':m,'arg':arg,'sender':ANON,'ingress_expiry':EXP}
rs = lambda paths: {'request_type':'read_state','paths':paths,'sender':ANON,'ingress_expiry':EXP}
# ENDPOINTS order in http_envelope.rs: 0 v2 call,1 v3 call,2 v4 call,3 v4 subnet call,4 v2 query,5 v3 query,
# 6 v3 subnet query,7 v2 rs,8 v3 rs,9 v2 subnet rs,10 v3 subnet rs. id: 0 mgmt,1 canister 0,2 subnet,3 bad.
# Management-canister argument: record { canister_id : principal } for canister 0 (candid).
status_arg = b'DIDL\x01\x6c\x01\xb3\xc4\xb1\xf2\x04\x68\x01\x00' + b'\x01' + bytes([len(CAN0)]) + CAN0
seeds = {
 'v2_call_canister': (0, 1, env(call(CAN0, 'inc'))),
 'v3_call_canister': (1, 1, env(call(CAN0, 'inc'))),
 'v4_call_mgmt': (2, 0, env(call(MGMT, 'canister_status', status_arg))),
 'v4_subnet_call': (3, 2, env(call(MGMT, 'provisional_create_canister_with_cycles', b'DIDL\x00\x00'))),
 'v2_query': (4, 1, env(query(CAN0, 'get'))),
 'v3_query_mgmt': (5, 0, env(query(MGMT, 'canister_status', status_arg))),
 'v3_subnet_query': (6, 2, env(query(MGMT, 'fetch_canister_logs', status_arg))),
 'v2_read_state_time': (7, 1, env(rs([[b'time']]))),
 'v3_read_state_many': (8, 1, env(rs([[b'time'], [b'request_status', bytes(32), b'reply'], [b'canister', CAN0, b'module_hash'], [b'canister', CAN0, b'metadata', b'candid:service'], [b'subnet']]))),
 'v2_subnet_read_state': (9, 2, env(rs([[b'subnet'], [b'time']]))),
 'v3_subnet_read_state': (10, 2, env(rs([[b'canister_ranges'], [b'api_boundary_nodes']]))),
 'v2_call_signed_fake': (0, 1, enc({'content': call(CAN0, 'inc'), 'sender_pubkey': b'\x30'*44, 'sender_sig': b'\x00'*64})),
}
for name, (e, i, body) in seeds.items():
    open(f'http_envelope/{name}', 'wb').write(bytes([e, i]) + body)
    # The request_id target gets the same envelopes and their contents.
    open(f'request_id/{name}', 'wb').write(body)
open('request_id/nested', 'wb').write(enc({'a': [1, -2, {'b': b'x', 'c': ('tag', 55799, 'd')}], 'e': 2**63}))
# Management payloads: byte 0 method index (see METHODS in management_args.rs), byte 1 who.
METHODS = ["provisional_create_canister_with_cycles","create_canister","install_code","install_chunked_code","upload_chunk","stored_chunks","clear_chunk_store","uninstall_code","canister_status","update_settings","start_canister","stop_canister","delete_canister","deposit_cycles","provisional_top_up_canister","raw_rand","canister_info","fetch_canister_logs","canister_metadata"]
for idx, m in enumerate(METHODS):
    open(f'management_args/{m}', 'wb').write(bytes([idx, 4]) + status_arg)
open('management_args/empty_args', 'wb').write(bytes([0, 0]) + b'DIDL\x00\x00')
# provisional_create_canister_with_cycles: record { amount : opt nat; settings : opt ... } -> send (null, null) as opt empty record fields
open('management_args/create_opt_none', 'wb').write(bytes([0, 1]) + b'DIDL\x02\x6c\x02\x00\x7f\x01\x7f\x6e\x7d\x01\x01')
# Block log: mode 1 (framed), payloads separated by FF FE.
def block(h, ingress): return enc({'height': h, 'time': NOW + h, 'ingress': ingress})
ing = {'request_id': list(range(32)), 'sender': ANON, 'canister_id': CAN0, 'effective_canister_id': CAN0, 'method_name': 'inc', 'arg': DIDL, 'ingress_expiry': EXP, 'size_bytes': 100}
open('block_log/framed_two', 'wb').write(b'\x01' + block(1, []) + b'\xff\xfe' + block(2, [ing]))
open('block_log/framed_torn_tail', 'wb').write(b'\x01' + block(1, [ing]) + b'\xff\xfd' + b'\x05\x00\x00')
open('block_log/raw_magic_only', 'wb').write(b'\x00OICBLK01')
