import socket, threading, time, sys
pp, bp, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); srv.bind(('127.0.0.1', bp)); srv.listen(512)
def ob(c):
    while c.recv(65536): pass
    c.close()
def acc():
    while True:
        c, _ = srv.accept(); threading.Thread(target=ob, args=(c,), daemon=True).start()
threading.Thread(target=acc, daemon=True).start()
t0 = time.time()
for i in range(n):
    s = socket.create_connection(('127.0.0.1', pp)); s.close()
print(f"{n} sequential in {time.time()-t0:.2f}s")
