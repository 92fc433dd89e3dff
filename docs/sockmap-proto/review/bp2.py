# T2: budget bound vs. a socket that is both a fallback source and a stuck
# redirect target. Backend writes (never reads); client writes (never reads).
# Usage: bp2.py PROXY_PORT BACKEND_PORT backend_sends(0/1) [CLIENT_RCVBUF]. Caps: 8 s, 300 MB.
import socket, threading, time, sys
pp, bp, bsend = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
def memavail():
    for l in open('/proc/meminfo'):
        if l.startswith('MemAvailable'): return int(l.split()[1]) / 1024
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); srv.bind(('127.0.0.1', bp)); srv.listen(8)
bsent = [0]; held = []
def be():
    c, _ = srv.accept(); held.append(c); c.setblocking(False); t0 = time.time()
    while bsend and time.time() - t0 < 9 and bsent[0] < 64e6:
        try: bsent[0] += c.send(b'y' * 16384); time.sleep(0.001)  # paced, so the redirect drains and gets top-ups
        except BlockingIOError: time.sleep(0.01)
threading.Thread(target=be, daemon=True).start()
m0 = memavail()
c = socket.socket(); c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, int(sys.argv[4]) if len(sys.argv) > 4 else 0 or 131072); c.connect(("127.0.0.1", pp)); c.setblocking(False)
time.sleep(1.0)
buf = b'x' * 65536; sent = 0; t0 = time.time(); last = 0
while time.time() - t0 < 8 and sent < 300e6:
    try: sent += c.send(buf)
    except BlockingIOError: time.sleep(0.01)
    if time.time() - last > 2:
        last = time.time(); print(f"{time.time()-t0:.0f}s client sent={sent/1e6:.1f}MB backend sent={bsent[0]/1e6:.1f}MB MemAvailable drop={m0-memavail():.0f}MB", flush=True)
print(f"final: backend_sends={bsend} client sent {sent/1e6:.1f} MB, backend sent {bsent[0]/1e6:.1f} MB, MemAvailable drop {m0-memavail():.0f} MB", flush=True)
