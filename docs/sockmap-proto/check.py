# Byte-exact relay check through a proxy: each client sends M random bytes,
# half-closes, and expects sha256(sent) + N random bytes + sha256(those).
import socket, threading, hashlib, os, sys, random, time
proxy_port, be_port, conns, maxsize = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); srv.bind(('127.0.0.1', be_port)); srv.listen(256)
def serve(c):
  try:
    serve1(c)
  except Exception as e: pass
def serve1(c):
    h = hashlib.sha256()
    while True:
        d = c.recv(1 << 16)
        if not d: break
        h.update(d)
    n = random.randint(0, maxsize); payload = os.urandom(n)
    c.sendall(h.hexdigest().encode() + payload + hashlib.sha256(payload).hexdigest().encode()); c.close()
def acc():
    while True:
        c, _ = srv.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
threading.Thread(target=acc, daemon=True).start()
bad = []; ok = [0]
def client(i):
  try:
    client1(i)
  except Exception as e: bad.append((i, repr(e)))
def client1(i):
    m = random.randint(0, maxsize); data = os.urandom(m)
    s = socket.create_connection(('127.0.0.1', proxy_port)); s.settimeout(30)
    def send(): s.sendall(data); s.shutdown(socket.SHUT_WR)
    t = threading.Thread(target=send); t.start()
    got = bytearray()
    while True:
        d = s.recv(1 << 16)
        if not d: break
        got += d
    t.join(); s.close()
    if bytes(got[:64]) != hashlib.sha256(data).hexdigest().encode(): bad.append((i, 'request', m, len(got)))
    elif hashlib.sha256(bytes(got[64:-64])).hexdigest().encode() != bytes(got[-64:]): bad.append((i, 'response', len(got)))
    else: ok[0] += 1
ts = [threading.Thread(target=client, args=(i,)) for i in range(conns)]
t0 = time.time(); [t.start() for t in ts]; [t.join() for t in ts]
print(f"ok={ok[0]} bad={len(bad)} {bad[:5]} in {time.time()-t0:.1f}s")
