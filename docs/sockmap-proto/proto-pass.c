// Prototype: TCP relay whose data path is a sockmap sk_skb verdict program.
#define _GNU_SOURCE
#include <linux/bpf.h>
#include <sys/syscall.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <errno.h>
#include <stdint.h>

static int map_fd;
static int nback; static int bports[8]; static int rr;

static long bpf(int cmd, union bpf_attr *a) { return syscall(SYS_bpf, cmd, a, sizeof(*a)); }

static struct bpf_insn I(uint8_t code, uint8_t dst, uint8_t src, int16_t off, int32_t imm) {
  struct bpf_insn i = {0}; i.code = code; i.dst_reg = dst; i.src_reg = src; i.off = off; i.imm = imm; return i;
}

static int load_prog(void) {
  struct bpf_insn p[] = {
    I(BPF_ALU64|BPF_MOV|BPF_X, 6, 1, 0, 0),              // r6 = ctx
    I(BPF_JMP|BPF_CALL, 0, 0, 0, BPF_FUNC_get_socket_cookie),
    I(BPF_STX|BPF_MEM|BPF_DW, 10, 0, -8, 0),             // *(u64*)(r10-8) = r0
    I(BPF_ALU64|BPF_MOV|BPF_X, 1, 6, 0, 0),              // r1 = ctx
    I(BPF_LD|BPF_DW|BPF_IMM, 2, BPF_PSEUDO_MAP_FD, 0, map_fd),
    I(0, 0, 0, 0, 0),
    I(BPF_ALU64|BPF_MOV|BPF_X, 3, 10, 0, 0),
    I(BPF_ALU64|BPF_ADD|BPF_K, 3, 0, 0, -8),
    I(BPF_ALU64|BPF_MOV|BPF_K, 4, 0, 0, 0),
    I(BPF_ALU64|BPF_MOV|BPF_K, 0, 0, 0, 1), // SK_PASS
    I(BPF_JMP|BPF_EXIT, 0, 0, 0, 0),
  };
  static char log[65536];
  union bpf_attr a; memset(&a, 0, sizeof a);
  a.prog_type = BPF_PROG_TYPE_SK_SKB; a.insns = (uint64_t)(uintptr_t)p; a.insn_cnt = sizeof p / sizeof p[0];
  a.license = (uint64_t)(uintptr_t)"GPL"; a.log_buf = (uint64_t)(uintptr_t)log; a.log_size = sizeof log; a.log_level = 1;
  int fd = bpf(BPF_PROG_LOAD, &a);
  if (fd < 0) { perror("prog load"); fprintf(stderr, "%s\n", log); exit(1); }
  return fd;
}

static uint64_t cookie(int fd) { uint64_t c; socklen_t l = sizeof c; if (getsockopt(fd, SOL_SOCKET, SO_COOKIE, &c, &l)) { perror("cookie"); exit(1);} return c; }
static void put(uint64_t key, int fd) {
  union bpf_attr a; memset(&a, 0, sizeof a); uint32_t v = fd;
  a.map_fd = map_fd; a.key = (uint64_t)(uintptr_t)&key; a.value = (uint64_t)(uintptr_t)&v; a.flags = BPF_ANY;
  if (bpf(BPF_MAP_UPDATE_ELEM, &a)) { perror("map update"); }
}

static void *conn(void *arg) {
  int c = (int)(intptr_t)arg, one = 1;
  int b = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(bports[__atomic_fetch_add(&rr, 1, __ATOMIC_RELAXED) % nback]) };
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(b, (void *)&sa, sizeof sa)) { perror("connect"); close(b); close(c); return 0; }
  setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  setsockopt(b, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  put(cookie(c), b); put(cookie(b), c);
  setsockopt(c, SOL_SOCKET, SO_RCVLOWAT, &one, sizeof one);  // kick data queued before the insert
  setsockopt(b, SOL_SOCKET, SO_RCVLOWAT, &one, sizeof one);
  struct pollfd p[2] = { { c, POLLRDHUP, 0 }, { b, POLLRDHUP, 0 } };
  int done[2] = {0, 0};
  while (!(done[0] && done[1])) {
    if (poll(p, 2, -1) < 0) continue;
    for (int i = 0; i < 2; i++) if (!done[i] && p[i].revents) {
      if (p[i].revents & (POLLERR | POLLHUP) && !(p[i].revents & POLLRDHUP)) { done[0] = done[1] = 1; break; }
      done[i] = 1; p[i].events = 0; p[i].fd = -1; shutdown(i ? c : b, SHUT_WR);
    }
  }
  close(c); close(b);
  return 0;
}

int main(int argc, char **argv) {
  int port = atoi(argv[1]); nback = argc - 2; for (int i = 0; i < nback; i++) bports[i] = atoi(argv[i + 2]);
  union bpf_attr a; memset(&a, 0, sizeof a);
  a.map_type = BPF_MAP_TYPE_SOCKHASH; a.key_size = 8; a.value_size = 4; a.max_entries = 65536;
  map_fd = bpf(BPF_MAP_CREATE, &a); if (map_fd < 0) { perror("map"); return 1; }
  int prog = load_prog();
  memset(&a, 0, sizeof a); a.target_fd = map_fd; a.attach_bpf_fd = prog; a.attach_type = BPF_SK_SKB_VERDICT;
  if (bpf(BPF_PROG_ATTACH, &a)) { perror("attach"); return 1; }
  int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
  setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(port) }; sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (bind(l, (void *)&sa, sizeof sa) || listen(l, 1024)) { perror("listen"); return 1; }
  for (;;) {
    int c = accept(l, 0, 0); if (c < 0) continue;
    pthread_t t; pthread_attr_t at; pthread_attr_init(&at); pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&at, 65536);
    pthread_create(&t, &at, conn, (void *)(intptr_t)c);
  }
}
