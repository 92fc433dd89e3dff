# T4: backend sends SIZE bytes, waits until the proxy has ACKed all of them
# (so they are in the proxy host's kernel), then resets (SO_LINGER 0).
# A relay could deliver all SIZE bytes. Usage: rstpeer.py PP BP SIZE
import socket, threading, time, sys, struct, fcntl, termios
pp, bp, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); srv.bind(('127.0.0.1', bp)); srv.listen(8)
payload = bytes((i * 7) & 255 for i in range(n))
outq_at_rst = [None]
def be():
    c, _ = srv.accept()
    while c.recv(65536): pass
    c.sendall(payload)
    t0 = time.time()
    while time.time() - t0 < 5:
        outq = struct.unpack('i', fcntl.ioctl(c, termios.TIOCOUTQ, b'\0\0\0\0'))[0]
        if outq == 0: break
        time.sleep(0.01)
    outq_at_rst[0] = outq
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0)); c.close()
threading.Thread(target=be, daemon=True).start()
s = socket.create_connection(('127.0.0.1', pp)); s.settimeout(5)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
s.sendall(b'request'); s.shutdown(socket.SHUT_WR)
got = b''; end = 'EOF'
try:
    while True:
        d = s.recv(65536)
        if not d: break
        got += d
        time.sleep(0.002)   # slow reader, so the proxy still holds bytes when the RST arrives
except Exception as e: end = repr(e)
print(f"size={n}: client got {len(got)} of {n} bytes; backend unacked at RST: {outq_at_rst[0]} (so {n - outq_at_rst[0]} were in the proxy), end={end}")
