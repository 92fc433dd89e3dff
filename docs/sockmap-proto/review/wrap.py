# T5: slot reuse. Pair A streams a counter pattern to a slow backend (so A's
# client->backend direction has run out of budget and relays by copy, with a
# backlog in ingress_msg). Then 4095 short pairs, then pair B = pair 4097, which
# gets A's slots (next_slot wraps at MAXSLOTS) and resets them (passing = 0).
# A's backend checks the byte order. Usage: wrap.py PP BP
import socket, threading, time, sys, struct
pp, bp = int(sys.argv[1]), int(sys.argv[2])
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); srv.bind(('127.0.0.1', bp)); srv.listen(512)
stop = threading.Event(); res = {'checked': 0, 'bad': None}
def a_backend(c):
    c.settimeout(1); exp = 0; pend = b''
    while not stop.is_set():
        try: d = c.recv(65536)
        except socket.timeout: continue
        if not d: break
        pend += d; k = len(pend) // 4 * 4
        for i in range(0, k, 4):
            v = struct.unpack_from('>I', pend, i)[0]
            if v != exp and res['bad'] is None: res['bad'] = (exp * 4, exp, v)
            exp = v + 1
        res['checked'] = exp * 4; pend = pend[k:]
        time.sleep(0.02)  # slow reader: ~3 MB/s
def other_backend(c):
    c.close()   # close at once; the filler client waits for this EOF, then closes (no long half-close)
first = [True]
def acc():
    while True:
        c, _ = srv.accept()
        f = a_backend if first[0] else other_backend; first[0] = False
        threading.Thread(target=f, args=(c,), daemon=True).start()
threading.Thread(target=acc, daemon=True).start()
def a_client():
    s = socket.create_connection(('127.0.0.1', pp)); time.sleep(0.3); n = 0
    s.settimeout(1)
    while not stop.is_set():
        chunk = b''.join(struct.pack('>I', i) for i in range(n, n + 16384)); n += 16384
        try: s.sendall(chunk)
        except socket.timeout: break
    held.append(s)
held = []
threading.Thread(target=a_client, daemon=True).start()
time.sleep(1.5)
print(f"before wrap: A's backend checked {res['checked']/1e6:.1f} MB in order, first disorder: {res['bad']}", flush=True)
cnt = [0]; lock = threading.Lock()
def filler():
    while True:
        with lock:
            if cnt[0] >= 4095: return
            cnt[0] += 1
        s = socket.create_connection(('127.0.0.1', pp)); s.settimeout(5)
        try: s.recv(1)
        except Exception: pass
        s.close()
t0 = time.time(); ts = [threading.Thread(target=filler) for _ in range(2)]; [t.start() for t in ts]; [t.join() for t in ts]
print(f"4095 fillers in {time.time()-t0:.1f}s; A's backend so far: {res['checked']/1e6:.1f} MB, disorder: {res['bad']}", flush=True)
b = socket.create_connection(('127.0.0.1', pp))   # pair 4097: takes A's slots
time.sleep(3)
stop.set()
print(f"after pair B: A's backend checked {res['checked']/1e6:.1f} MB; first disorder (offset, expected, got): {res['bad']}", flush=True)
