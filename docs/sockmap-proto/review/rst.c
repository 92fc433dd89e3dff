// T4b: kernel-level check. Y (accepted socket) is put in a sockhash whose verdict
// returns SK_PASS (mode 1), or in a sockhash without programs (mode 2), or in no
// map (mode 0). X sends N bytes; once Y's kernel has ACKed all of them, X resets
// (SO_LINGER 0). Then Y reads slowly: how many of the N bytes can it still read?
// Usage: rst PORT MODE N
#define _GNU_SOURCE
#include <linux/bpf.h>
#include <sys/syscall.h>
#include <sys/socket.h>
#include <sys/ioctl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <linux/sockios.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <errno.h>
#include <fcntl.h>
static long bpf(int cmd, union bpf_attr *a) { return syscall(SYS_bpf, cmd, a, sizeof(*a)); }
int main(int argc, char **argv) {
  int port = atoi(argv[1]), mode = atoi(argv[2]), n = atoi(argv[3]), one = 1;
  int l = socket(AF_INET, SOCK_STREAM, 0); setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(port) }; sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (bind(l, (void *)&sa, sizeof sa) || listen(l, 4)) { perror("listen"); return 1; }
  int x = socket(AF_INET, SOCK_STREAM, 0); if (connect(x, (void *)&sa, sizeof sa)) { perror("connect"); return 1; }
  int y = accept(l, 0, 0);
  if (mode) {
    union bpf_attr a; memset(&a, 0, sizeof a);
    a.map_type = BPF_MAP_TYPE_SOCKHASH; a.key_size = 4; a.value_size = 4; a.max_entries = 4;
    int m = bpf(BPF_MAP_CREATE, &a); if (m < 0) { perror("map"); return 1; }
    if (mode == 1) {
      struct bpf_insn code[2] = { { .code = BPF_ALU64 | BPF_MOV | BPF_K, .dst_reg = 0, .imm = 1 }, { .code = BPF_JMP | BPF_EXIT } };
      memset(&a, 0, sizeof a); a.prog_type = BPF_PROG_TYPE_SK_SKB; a.insns = (uintptr_t)code; a.insn_cnt = 2; a.license = (uintptr_t)"GPL";
      int p = bpf(BPF_PROG_LOAD, &a); if (p < 0) { perror("prog"); return 1; }
      memset(&a, 0, sizeof a); a.target_fd = m; a.attach_bpf_fd = p; a.attach_type = BPF_SK_SKB_VERDICT;
      if (bpf(BPF_PROG_ATTACH, &a)) { perror("attach"); return 1; }
    }
    int k = 1; memset(&a, 0, sizeof a); a.map_fd = m; a.key = (uintptr_t)&k; a.value = (uintptr_t)&y;
    if (bpf(BPF_MAP_UPDATE_ELEM, &a)) { perror("update"); return 1; }
  }
  char *buf = malloc(n); memset(buf, 'z', n);
  fcntl(x, F_SETFL, O_NONBLOCK);
  int sent = 0, rcvd = 0; char rb[4096];
  // Send all N; Y must not read yet, except if X cannot make progress (window closed).
  for (int i = 0; sent < n && i < 20000; i++) {
    int w = send(x, buf + sent, n - sent, MSG_NOSIGNAL);
    if (w > 0) sent += w; else usleep(100);
  }
  for (int i = 0; i < 500; i++) { int q = 0; ioctl(x, SIOCOUTQ, &q); if (!q) break; usleep(1000); }
  int q = 0; ioctl(x, SIOCOUTQ, &q);
  struct linger lg = { 1, 0 }; setsockopt(x, SOL_SOCKET, SO_LINGER, &lg, sizeof lg); close(x);
  usleep(100000);
  int err = 0;
  for (;;) {
    int r = recv(y, rb, sizeof rb, MSG_DONTWAIT);
    if (r > 0) { rcvd += r; continue; }
    if (r < 0 && errno == EAGAIN) { usleep(1000); if (++err > 200) { printf("(EAGAIN for 200 ms) "); break; } continue; }
    if (r < 0) printf("(recv: %s) ", strerror(errno)); else printf("(EOF) ");
    break;
  }
  printf("mode %d: X sent %d, unacked at RST %d; Y read %d after the RST\n", mode, sent, q, rcvd);
  return 0;
}
