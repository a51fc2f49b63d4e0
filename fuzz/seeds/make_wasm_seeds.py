# Writes the wasm_module seeds. Run from fuzz/seeds: python3 make_wasm_seeds.py
import os, gzip
def leb(n):
    out=bytearray()
    while True:
        b=n&0x7f; n>>=7
        if n: out.append(b|0x80)
        else: out.append(b); return bytes(out)
def sleb(n):
    out=bytearray()
    while True:
        b=n&0x7f; n>>=7
        if (n==0 and not b&0x40) or (n==-1 and b&0x40): out.append(b); return bytes(out)
        out.append(b|0x80)
def vec(items): return leb(len(items))+b''.join(items)
def name(s): s=s.encode(); return leb(len(s))+s
def sec(id, body): return bytes([id])+leb(len(body))+body
HDR=b'\0asm\x01\0\0\0'
functype_void=b'\x60\x00\x00'
functype_i32_i32_void=b'\x60\x02\x7f\x7f\x00'
def module(mem64=False, custom=False, start=False, table=False, init=True):
    types=sec(1, vec([functype_void, b'\x60\x02\x7e\x7e\x00' if mem64 else functype_i32_i32_void]))
    imports=sec(2, vec([name('ic0')+name('msg_reply')+b'\x00'+leb(0),
                        name('ic0')+name('msg_reply_data_append')+b'\x00'+leb(1)]))
    # funcs 2,3,4 (after 2 imports)
    funcs=sec(3, vec([leb(0),leb(0),leb(0)]))
    tables=sec(4, vec([b'\x70\x00'+leb(1)])) if table else b''
    mem=sec(5, vec([(b'\x04' if mem64 else b'\x00')+leb(1)]))
    glob=sec(6, vec([b'\x7f\x01'+b'\x41'+sleb(5)+b'\x0b']))
    exports=[name('canister_query q')+b'\x00'+leb(2), name('canister_update u')+b'\x00'+leb(3), name('memory')+b'\x02'+leb(0)]
    if init: exports.append(name('canister_init')+b'\x00'+leb(4))
    exp=sec(7, vec(exports))
    st=sec(8, leb(4)) if start else b''
    elem=sec(9, vec([b'\x00'+b'\x41\x00\x0b'+vec([leb(2)])])) if table else b''
    constop=(b'\x42' if mem64 else b'\x41')
    # q: msg_reply_data_append(0, 5); msg_reply
    q=b'\x00'+constop+sleb(0)+b'\x41'+sleb(5)+b'\x10'+leb(1)+b'\x10'+leb(0)+b'\x0b' if not mem64 else b'\x00'+b'\x10'+leb(0)+b'\x0b'
    u=b'\x00'+b'\x23\x00\x41\x01\x6a\x24\x00'+b'\x10'+leb(0)+b'\x0b'
    i=b'\x00\x0b'
    code=sec(10, vec([leb(len(f))+f for f in (q,u,i)]))
    data=sec(11, vec([b'\x00'+constop+sleb(0)+b'\x0b'+vec([bytes([c]) for c in b'hello'])]))
    cust=sec(0, name('icp:public candid:service')+b'service : { q : () -> () query }') if custom else b''
    return HDR+types+imports+funcs+tables+mem+glob+exp+st+elem+code+data+cust
out='wasm_module'
open(f'{out}/empty.wasm','wb').write(HDR)
open(f'{out}/basic.wasm','wb').write(module())
open(f'{out}/custom_start_table.wasm','wb').write(module(custom=True,start=True,table=True))
open(f'{out}/wasm64.wasm','wb').write(module(mem64=True))
open(f'{out}/basic.wasm.gz','wb').write(gzip.compress(module(custom=True), mtime=0))
