# T1: a client that half-closes and then waits for a slow response.
# Usage: spin.py PROXY_PORT BACKEND_PORT PROXY_PID halfclose(0/1)
# Backend reads 100 bytes (or to EOF), waits 3 s, answers 10 bytes, closes.
# Prints the proxy process's CPU seconds used during the 3 s wait.
import socket, threading, time, sys
pp, bp, pid, half = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def cpu():
    f = open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()
    return (int(f[11]) + int(f[12])) / 100.0
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); srv.bind(('127.0.0.1', bp)); srv.listen(8)
def be():
    c, _ = srv.accept(); got = b''
    while len(got) < 100:
        d = c.recv(4096)
        if not d: break
        got += d
    time.sleep(3); c.sendall(b'0123456789'); c.close()
threading.Thread(target=be, daemon=True).start()
s = socket.create_connection(('127.0.0.1', pp)); s.settimeout(10)
s.sendall(b'x' * 100)
if half: s.shutdown(socket.SHUT_WR)
time.sleep(0.3); c0 = cpu(); t0 = time.time()
resp = b''
while True:
    d = s.recv(4096)
    if not d: break
    resp += d
print(f"halfclose={half} resp={resp!r} proxy CPU {cpu()-c0:.2f}s over {time.time()-t0:.2f}s wall")
