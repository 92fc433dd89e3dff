import socket, struct, time, fcntl, termios
SIOCOUTQ = termios.TIOCOUTQ
def info(s):
    b = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    acked, received = struct.unpack_from('QQ', b, 120)
    outq = struct.unpack('i', fcntl.ioctl(s.fileno(), SIOCOUTQ, b'\0\0\0\0'))[0]
    return acked, received, outq
l = socket.socket(); l.bind(('127.0.0.1', 0)); l.listen(1)
a = socket.create_connection(l.getsockname()); b, _ = l.accept()
print('fresh            a(acked,recv,outq)=', info(a), ' b=', info(b))
a.sendall(b'x' * 1000); time.sleep(0.1)
print('a sent 1000      a=', info(a), ' b=', info(b))
b.recv(4096)
a.shutdown(socket.SHUT_WR); time.sleep(0.1)
print('a FIN            a=', info(a), ' b=', info(b))
b.sendall(b'y' * 10); b.shutdown(socket.SHUT_WR); time.sleep(0.1)
print('b 10 + FIN       a=', info(a), ' b=', info(b))
