# T3: backend answers with its FIN piggybacked on the last data segment
# (TCP_CORK, send, close) after the client half-closed (proxy's backend socket
# is in FIN_WAIT2 when the answer arrives). Usage: finpiggy.py PP BP SIZE CORK(0/1)
import socket, threading, time, sys, hashlib
pp, bp, n, cork = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); srv.bind(('127.0.0.1', bp)); srv.listen(8)
payload = bytes((i * 7) & 255 for i in range(n))
def be():
    c, _ = srv.accept()
    while c.recv(65536): pass
    time.sleep(0.2)
    if cork: c.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
    c.sendall(payload); c.close()
threading.Thread(target=be, daemon=True).start()
s = socket.create_connection(('127.0.0.1', pp)); s.settimeout(5)
s.sendall(b'request'); s.shutdown(socket.SHUT_WR)
got = b''
try:
    while True:
        d = s.recv(65536)
        if not d: break
        got += d
    print(f"size={n} cork={cork}: got {len(got)} bytes, exact={got == payload}")
except socket.timeout:
    print(f"size={n} cork={cork}: TIMEOUT after 5 s with {len(got)} of {n} bytes (exact prefix={payload.startswith(got)})")
