// Does removing X from the verdict map (X still in a second map) keep the
// passed bytes, and does recv return them before later bytes?
#define _GNU_SOURCE
#include <linux/bpf.h>
#include <sys/syscall.h>
#include <sys/socket.h>
#include <sys/ioctl.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <stdint.h>
#include <errno.h>
static long bpf(int cmd, union bpf_attr *a) { return syscall(SYS_bpf, cmd, a, sizeof(*a)); }
static int mkmap(void) { union bpf_attr a; memset(&a, 0, sizeof a); a.map_type = BPF_MAP_TYPE_SOCKHASH; a.key_size = 8; a.value_size = 4; a.max_entries = 64; int f = bpf(BPF_MAP_CREATE, &a); if (f < 0) { perror("map"); exit(1);} return f; }
static void put(int m, uint64_t key, int fd) { union bpf_attr a; memset(&a, 0, sizeof a); uint32_t v = fd; a.map_fd = m; a.key = (uintptr_t)&key; a.value = (uintptr_t)&v; if (bpf(BPF_MAP_UPDATE_ELEM, &a)) perror("update"); }
static void del(int m, uint64_t key) { union bpf_attr a; memset(&a, 0, sizeof a); a.map_fd = m; a.key = (uintptr_t)&key; if (bpf(BPF_MAP_DELETE_ELEM, &a)) perror("delete"); }
int main(void) {
  int A = mkmap(), B = mkmap();
  struct bpf_insn p[] = { { BPF_ALU64|BPF_MOV|BPF_K, 0, 0, 0, 1 }, { BPF_JMP|BPF_EXIT, 0, 0, 0, 0 } };  // SK_PASS
  union bpf_attr a; memset(&a, 0, sizeof a); a.prog_type = BPF_PROG_TYPE_SK_SKB; a.insns = (uintptr_t)p; a.insn_cnt = 2; a.license = (uintptr_t)"GPL";
  int prog = bpf(BPF_PROG_LOAD, &a); if (prog < 0) { perror("load"); return 1; }
  memset(&a, 0, sizeof a); a.target_fd = A; a.attach_bpf_fd = prog; a.attach_type = BPF_SK_SKB_VERDICT; if (bpf(BPF_PROG_ATTACH, &a)) { perror("attach"); return 1; }
  int l = socket(AF_INET, SOCK_STREAM, 0); struct sockaddr_in sa = { .sin_family = AF_INET }; sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(l, (void *)&sa, sizeof sa); listen(l, 1); socklen_t sl = sizeof sa; getsockname(l, (void *)&sa, &sl);
  int c = socket(AF_INET, SOCK_STREAM, 0); connect(c, (void *)&sa, sizeof sa); int x = accept(l, 0, 0);
  put(A, 1, x); put(B, 1, x);
  write(c, "AAAA", 4); usleep(100000);
  int n = -1; ioctl(x, FIONREAD, &n); printf("FIONREAD after passed bytes: %d\n", n);
  del(A, 1); if (getenv("BOTH")) del(B, 1);
  write(c, "BBBB", 4); usleep(100000);
  ioctl(x, FIONREAD, &n); printf("FIONREAD after removal + more bytes: %d\n", n);
  char buf[64] = {0}; int got = 0, r;
  for (int i = 0; i < 4 && got < 8; i++) { r = recv(x, buf + got, sizeof buf - 1 - got, MSG_DONTWAIT); printf("  recv -> %d (%s)\n", r, r < 0 ? strerror(errno) : "ok"); if (r > 0) got += r; usleep(10000); }
  printf("recv: '%s' (%d bytes)\n", buf, got);
  // Re-add and check the queued bytes get the verdict on the kick.
  put(A, 1, x); write(c, "CCCC", 4); usleep(100000);
  memset(buf, 0, sizeof buf); got = recv(x, buf, sizeof buf - 1, MSG_DONTWAIT); printf("after re-add: '%s'\n", buf);
  return 0;
}
