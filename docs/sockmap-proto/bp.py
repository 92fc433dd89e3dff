import socket, threading, time, os
# backend that accepts and never reads
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); srv.bind(('127.0.0.1', 18099)); srv.listen(8)
held = []
def acc():
    while True:
        c, _ = srv.accept(); held.append(c)
threading.Thread(target=acc, daemon=True).start()
c = socket.create_connection(('127.0.0.1', 18095)); c.setblocking(False)
buf = b'x' * 65536; sent = 0; t0 = time.time(); last = 0
def mem():
    for l in open('/proc/net/sockstat'):
        if l.startswith('TCP:'): return l.strip()
while time.time() - t0 < 8:
    try: sent += c.send(buf)
    except BlockingIOError: time.sleep(0.01)
    if time.time() - last > 1:
        last = time.time(); print(f"{time.time()-t0:.0f}s sent={sent/1e6:.1f}MB {mem()}", flush=True)
print("final sent MB", sent/1e6)
