// Prototype 2: sockmap relay with a per-direction byte budget.
// The verdict redirects while the direction has budget, and passes (sticky)
// once it runs out; passed bytes go to the socket's own ingress_msg, which is
// flow-controlled, and the pair's thread relays that direction by copy from
// then on (after the redirected bytes have reached the peer). A ring buffer
// event at the low-water mark lets user space top the budget up while the peer
// keeps draining. Usage: proto2 PORT BACKEND_PORT...
#define _GNU_SOURCE
#include <linux/bpf.h>
#include <sys/syscall.h>
#include <sys/socket.h>
#include <sys/mman.h>
#include <sys/ioctl.h>
#include <sys/eventfd.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <linux/sockios.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <errno.h>
#include <stdint.h>
#include <fcntl.h>
#include <time.h>

#define MAXSLOTS 8192            // two per pair
#define BUDGET (128u << 10)      // bytes a direction may have in flight towards its peer
#define SNDBUF (512 << 10)       // locked send buffer, so the peer can always take BUDGET
#define LOW (BUDGET / 2)         // notify when less than this is left

struct slot { uint64_t granted, used; uint32_t passing, notified; };

static int sockhash_b;
static int sockhash, slots_fd, slotmap_fd, rb_fd;
static struct slot *slots;
static int nback, bports[8], rr, next_slot;
static int pair_efd[MAXSLOTS / 2];
static int pair_fd[MAXSLOTS];     // socket each slot reads from (the source)
static int peer_fd[MAXSLOTS];     // socket it writes to
static uint64_t lb_wrote[MAXSLOTS]; // bytes this program wrote itself to the peer, before the switch
static int peer_syn[MAXSLOTS];    // 1 if the peer socket made the connect (bytes_acked counts its SYN)

static long bpf(int cmd, union bpf_attr *a) { return syscall(SYS_bpf, cmd, a, sizeof(*a)); }
static struct bpf_insn I(uint8_t code, uint8_t dst, uint8_t src, int16_t off, int32_t imm) {
  struct bpf_insn i = {0}; i.code = code; i.dst_reg = dst; i.src_reg = src; i.off = off; i.imm = imm; return i;
}
#define MOVX(d, s) I(BPF_ALU64|BPF_MOV|BPF_X, d, s, 0, 0)
#define MOVK(d, k) I(BPF_ALU64|BPF_MOV|BPF_K, d, 0, 0, k)
#define ADDK(d, k) I(BPF_ALU64|BPF_ADD|BPF_K, d, 0, 0, k)
#define ADDX(d, s) I(BPF_ALU64|BPF_ADD|BPF_X, d, s, 0, 0)
#define SUBX(d, s) I(BPF_ALU64|BPF_SUB|BPF_X, d, s, 0, 0)
#define LDX(sz, d, s, o) I(BPF_LDX|BPF_MEM|sz, d, s, o, 0)
#define STX(sz, d, s, o) I(BPF_STX|BPF_MEM|sz, d, s, o, 0)
#define STK(sz, d, o, k) I(BPF_ST|BPF_MEM|sz, d, 0, o, k)
#define CALL(f) I(BPF_JMP|BPF_CALL, 0, 0, 0, f)
#define JEQK(d, k, o) I(BPF_JMP|BPF_JEQ|BPF_K, d, 0, o, k)
#define JNEK(d, k, o) I(BPF_JMP|BPF_JNE|BPF_K, d, 0, o, k)
#define JGTX(d, s, o) I(BPF_JMP|BPF_JGT|BPF_X, d, s, o, 0)
#define JGEK(d, k, o) I(BPF_JMP|BPF_JGE|BPF_K, d, 0, o, k)
#define LDMAP(d, fd) I(BPF_LD|BPF_DW|BPF_IMM, d, BPF_PSEUDO_MAP_FD, 0, fd), I(0, 0, 0, 0, 0)
#define EXIT I(BPF_JMP|BPF_EXIT, 0, 0, 0, 0)


static struct bpf_insn code[128]; static int ncode;
static int labels[16]; static struct { int at, label; } fix[32]; static int nfix;
static void E(struct bpf_insn i) { code[ncode++] = i; }
static void L(int l) { labels[l] = ncode; }
static void J(struct bpf_insn i, int l) { fix[nfix].at = ncode; fix[nfix++].label = l; E(i); }
static void LDMAPFD(int d, int fd) { E(I(BPF_LD|BPF_DW|BPF_IMM, d, BPF_PSEUDO_MAP_FD, 0, fd)); E(I(0, 0, 0, 0, 0)); }
enum { PASS, EXHAUST, REDIRECT, NOTIFY_DONE, EMPTY };

static int load_prog(void) {
  // r6 ctx, r7 slot value; stack: -8 cookie, -16 slot index (also the event)
  E(MOVX(6, 1));
  // A FIN arrives as an skb of its own with no data: redirected, the
  // backlog's send of 0 bytes counts as a broken pipe on the peer. Drop it;
  // TCP has already processed the FIN.
  E(LDX(BPF_W, 2, 6, 0)); J(JEQK(2, 0, 0), EMPTY);
  E(CALL(BPF_FUNC_get_socket_cookie));
  E(STX(BPF_DW, 10, 0, -8));
  LDMAPFD(1, slotmap_fd); E(MOVX(2, 10)); E(ADDK(2, -8));
  E(CALL(BPF_FUNC_map_lookup_elem));
  J(JEQK(0, 0, 0), PASS);                       // not ours: pass
  E(LDX(BPF_W, 1, 0, 0)); E(STX(BPF_W, 10, 1, -16));
  LDMAPFD(1, slots_fd); E(MOVX(2, 10)); E(ADDK(2, -16));
  E(CALL(BPF_FUNC_map_lookup_elem));
  J(JEQK(0, 0, 0), PASS);
  E(MOVX(7, 0));
  E(LDX(BPF_W, 1, 7, 16)); J(JNEK(1, 0, 0), PASS);   // passing: sticky
  E(LDX(BPF_W, 2, 6, 0));                        // skb->len
  E(LDX(BPF_DW, 3, 7, 8)); E(ADDX(3, 2));        // used + len
  E(LDX(BPF_DW, 4, 7, 0));                       // granted
  J(JGTX(3, 4, 0), EXHAUST);
  E(STX(BPF_DW, 7, 3, 8));                       // used += len
  E(SUBX(4, 3)); J(JGEK(4, LOW, 0), REDIRECT);   // plenty left
  E(LDX(BPF_W, 1, 7, 20)); J(JNEK(1, 0, 0), REDIRECT);
  E(STK(BPF_W, 7, 20, 1));                       // notified = 1
  LDMAPFD(1, rb_fd); E(MOVX(2, 10)); E(ADDK(2, -16)); E(MOVK(3, 8)); E(MOVK(4, 0));
  E(CALL(BPF_FUNC_ringbuf_output));
  L(REDIRECT);
  E(MOVX(1, 6)); LDMAPFD(2, sockhash_b); E(MOVX(3, 10)); E(ADDK(3, -8)); E(MOVK(4, 0));
  E(CALL(BPF_FUNC_sk_redirect_hash));
  E(EXIT);
  L(EXHAUST);
  E(STK(BPF_W, 7, 16, 1));                       // passing = 1
  LDMAPFD(1, rb_fd); E(MOVX(2, 10)); E(ADDK(2, -16)); E(MOVK(3, 8)); E(MOVK(4, 0));
  E(CALL(BPF_FUNC_ringbuf_output));
  L(PASS);
  E(MOVK(0, 1));                                 // SK_PASS
  E(EXIT);
  L(EMPTY);
  E(MOVK(0, 0));                                 // SK_DROP
  E(EXIT);
  for (int i = 0; i < nfix; i++) code[fix[i].at].off = labels[fix[i].label] - fix[i].at - 1;
  static char log[1 << 16];
  union bpf_attr a; memset(&a, 0, sizeof a);
  a.prog_type = BPF_PROG_TYPE_SK_SKB; a.insns = (uintptr_t)code; a.insn_cnt = ncode;
  a.license = (uintptr_t)"GPL"; a.log_buf = (uintptr_t)log; a.log_size = sizeof log; a.log_level = 1;
  int fd = bpf(BPF_PROG_LOAD, &a);
  if (fd < 0) { perror("prog load"); fprintf(stderr, "%s\n", log); exit(1); }
  return fd;
}


static int mkmap(int type, int ks, int vs, int n, int flags) {
  union bpf_attr a; memset(&a, 0, sizeof a);
  a.map_type = type; a.key_size = ks; a.value_size = vs; a.max_entries = n; a.map_flags = flags;
  int fd = bpf(BPF_MAP_CREATE, &a); if (fd < 0) { perror("map create"); exit(1); } return fd;
}
static int update(int m, void *k, void *v) {
  union bpf_attr a; memset(&a, 0, sizeof a); a.map_fd = m; a.key = (uintptr_t)k; a.value = (uintptr_t)v; a.flags = BPF_ANY;
  return bpf(BPF_MAP_UPDATE_ELEM, &a);
}
static void delete(int m, void *k) { union bpf_attr a; memset(&a, 0, sizeof a); a.map_fd = m; a.key = (uintptr_t)k; bpf(BPF_MAP_DELETE_ELEM, &a); }
static uint64_t cookie(int fd) { uint64_t c = 0; socklen_t l = sizeof c; getsockopt(fd, SOL_SOCKET, SO_COOKIE, &c, &l); return c; }

// Bytes handed to socket fd's send queue so far, its SYN included if it connected.
static uint64_t handed(int fd) {
  uint8_t ti[232]; socklen_t l = sizeof ti; memset(ti, 0, sizeof ti);
  getsockopt(fd, IPPROTO_TCP, TCP_INFO, ti, &l);
  uint64_t acked; memcpy(&acked, ti + 120, 8);
  int outq = 0; ioctl(fd, SIOCOUTQ, &outq);
  return acked + (uint64_t)outq;
}
// Everything the verdict redirected for slot s has reached the peer's socket.
static int drained(int s) {
  uint64_t used = __atomic_load_n(&slots[s].used, __ATOMIC_ACQUIRE);
  return handed(peer_fd[s]) - peer_syn[s] - lb_wrote[s] >= used;
}

// Bytes received on fd, a received FIN counting 1.
static uint64_t received(int fd) {
  uint8_t ti[232]; socklen_t l = sizeof ti; memset(ti, 0, sizeof ti);
  getsockopt(fd, IPPROTO_TCP, TCP_INFO, ti, &l);
  uint64_t r; memcpy(&r, ti + 136 - 8, 8); return r;
}
// After the source's FIN: the verdict has seen every byte before it (the
// RDHUP wakeup comes from tcp_fin, ahead of the verdict for the same skb),
// and all of them have reached the peer.
static int fin_drained(int s) {
  uint64_t used = __atomic_load_n(&slots[s].used, __ATOMIC_ACQUIRE);
  return received(pair_fd[s]) - 1 == used && drained(s);
}

static uint64_t topups, fallbacks, declined, insert_failed, early_eof;

static void *ringbuf_thread(void *arg) {
  (void)arg;
  long page = sysconf(_SC_PAGESIZE); size_t rbsize = 1 << 16;
  volatile uint64_t *cons = mmap(0, page, PROT_READ | PROT_WRITE, MAP_SHARED, rb_fd, 0);
  volatile uint64_t *prod = mmap(0, page + 2 * rbsize, PROT_READ, MAP_SHARED, rb_fd, page);
  if (cons == MAP_FAILED || prod == MAP_FAILED) { perror("ringbuf mmap"); exit(1); }
  uint8_t *data = (uint8_t *)prod + page;
  for (;;) {
    struct pollfd p = { rb_fd, POLLIN, 0 };
    poll(&p, 1, 1000);
    static time_t last; if (time(0) - last >= 5) { last = time(0); fprintf(stderr, "topups %lu fallbacks %lu declined %lu insert_failed %lu early_eof %lu\n", topups, fallbacks, declined, insert_failed, early_eof); }
    uint64_t c = *cons, pr = __atomic_load_n(prod, __ATOMIC_ACQUIRE);
    while (c < pr) {
      uint32_t *hdr = (uint32_t *)(data + (c & (rbsize - 1)));
      uint32_t len = __atomic_load_n(hdr, __ATOMIC_ACQUIRE);
      if (len & BPF_RINGBUF_BUSY_BIT) break;
      uint32_t s = *(uint32_t *)(hdr + 2);
      c += (8 + (len & ~(BPF_RINGBUF_BUSY_BIT | BPF_RINGBUF_DISCARD_BIT)) + 7) & ~7ULL;
      __atomic_store_n(cons, c, __ATOMIC_RELEASE);
      if (s >= MAXSLOTS) continue;
      if (__atomic_load_n(&slots[s].passing, __ATOMIC_ACQUIRE)) {
        __atomic_fetch_add(&fallbacks, 1, __ATOMIC_RELAXED);
        uint64_t one = 1; write(pair_efd[s / 2], &one, 8);
      } else {
        // Grant only what the peer's send queue can still take, so that
        // redirected bytes never wait in its psock (where our own passed
        // bytes would queue behind them, uncharged).
        uint64_t used = __atomic_load_n(&slots[s].used, __ATOMIC_ACQUIRE);
        int outq = 0; ioctl(peer_fd[s], SIOCOUTQ, &outq);
        uint64_t delivered = handed(peer_fd[s]) - peer_syn[s] - lb_wrote[s];
        uint64_t pending = (uint64_t)outq + (used > delivered ? used - delivered : 0);
        if (pending < BUDGET / 2) {
          uint64_t want = used + (BUDGET - pending);
          if (want > slots[s].granted) __atomic_store_n(&slots[s].granted, want, __ATOMIC_RELEASE);
          __atomic_store_n(&slots[s].notified, 0, __ATOMIC_RELEASE);
          __atomic_fetch_add(&topups, 1, __ATOMIC_RELAXED);
        } else {
          __atomic_fetch_add(&declined, 1, __ATOMIC_RELAXED);  // the peer is not draining: let it run out and fall back
        }
      }
    }
  }
  return 0;
}

enum { REDIRECTING, COPYING, DONE };

static void *conn(void *arg) {
  int c = (int)(intptr_t)arg, one = 1;
  int b = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(bports[__atomic_fetch_add(&rr, 1, __ATOMIC_RELAXED) % nback]) };
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(b, (void *)&sa, sizeof sa)) { perror("connect"); close(b); close(c); return 0; }
  setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  setsockopt(b, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  int sb = SNDBUF / 2; setsockopt(c, SOL_SOCKET, SO_SNDBUF, &sb, sizeof sb); setsockopt(b, SOL_SOCKET, SO_SNDBUF, &sb, sizeof sb);
  int s0 = __atomic_fetch_add(&next_slot, 2, __ATOMIC_RELAXED) % MAXSLOTS, s1 = s0 + 1;
  int efd = eventfd(0, EFD_NONBLOCK); pair_efd[s0 / 2] = efd;
  int src[2] = { c, b }, dst[2] = { b, c }, sl[2] = { s0, s1 };
  for (int d = 0; d < 2; d++) {
    int s = sl[d];
    pair_fd[s] = src[d]; peer_fd[s] = dst[d]; lb_wrote[s] = 0; peer_syn[s] = dst[d] == b;
    slots[s] = (struct slot){ .granted = BUDGET };
  }
  uint64_t kc = cookie(c), kb = cookie(b);
  // Targets first (map B, no programs), then the slots, then the verdict (map A).
  // A socket joins a sockhash only while ESTABLISHED (EOPNOTSUPP once it
  // has seen a FIN). Each step that fails leaves its direction on copy.
  int state[2] = { REDIRECTING, REDIRECTING };
  uint32_t v0 = s0, v1 = s1;
  if (update(sockhash_b, &kc, &b) || update(sockhash_b, &kb, &c)) {
    delete(sockhash_b, &kc); delete(sockhash_b, &kb);   // no verdict ran: nothing consumed
    state[0] = state[1] = COPYING; __atomic_fetch_add(&insert_failed, 1, __ATOMIC_RELAXED);
  } else {
    update(slotmap_fd, &kc, &v0); update(slotmap_fd, &kb, &v1);
    if (update(sockhash, &kc, &c)) { state[0] = state[1] = COPYING; __atomic_fetch_add(&insert_failed, 1, __ATOMIC_RELAXED); }
    else if (update(sockhash, &kb, &b)) { state[1] = COPYING; __atomic_fetch_add(&insert_failed, 1, __ATOMIC_RELAXED); }
  }
  setsockopt(c, SOL_SOCKET, SO_RCVLOWAT, &one, sizeof one);  // run the verdict on bytes already queued
  setsockopt(b, SOL_SOCKET, SO_RCVLOWAT, &one, sizeof one);
  fcntl(c, F_SETFL, O_NONBLOCK); fcntl(b, F_SETFL, O_NONBLOCK);
  int eof[2] = { 0, 0 }, broken = 0, retry = 0; uint64_t lb_read[2] = { 0, 0 };
  static __thread char buf[2][32768]; size_t held[2] = { 0, 0 }, off[2] = { 0, 0 };
  while (!broken && !(state[0] == DONE && state[1] == DONE)) {
    struct pollfd p[3] = { { c, POLLRDHUP, 0 }, { b, POLLRDHUP, 0 }, { efd, POLLIN, 0 } };
    int timeout = retry ? 1 : -1; retry = 0;
    for (int d = 0; d < 2; d++) {
      if (state[d] == COPYING && !held[d] && !eof[d]) p[d].events |= POLLIN;        // source d readable
      if (state[d] == COPYING && held[d]) p[1 - d].events |= POLLOUT;             // dst writable
      if (state[d] == REDIRECTING && (eof[d] || __atomic_load_n(&slots[sl[d]].passing, __ATOMIC_ACQUIRE))) timeout = 1;  // waiting for the drain
    }
    if (poll(p, 3, timeout) < 0) continue;
    if (p[2].revents) { uint64_t x; read(efd, &x, 8); }
    for (int d = 0; d < 2; d++) {
      if (p[d].revents & POLLERR) { broken = 1; int e = 0; socklen_t el = sizeof e; getsockopt(src[d], SOL_SOCKET, SO_ERROR, &e, &el); fprintf(stderr, "POLLERR on %s: %s (state %d/%d eof %d/%d) used %lu/%lu handed %lu/%lu\n", d ? "backend" : "client", strerror(e), state[0], state[1], eof[0], eof[1], slots[s0].used, slots[s1].used, handed(b), handed(c)); }
      if (p[d].revents & (POLLRDHUP | POLLHUP)) eof[d] = eof[d] || state[d] == REDIRECTING;
      int s = sl[d];
      if (state[d] == REDIRECTING && __atomic_load_n(&slots[s].passing, __ATOMIC_ACQUIRE) && drained(s)) {
        lb_wrote[s] = 0; // from here on the copy writes; drained() is no longer asked for this slot
        state[d] = COPYING; eof[d] = 0;
      }
      if (state[d] == REDIRECTING && eof[d] && !__atomic_load_n(&slots[s].passing, __ATOMIC_ACQUIRE) && fin_drained(s)) { if (getenv("DBG")) fprintf(stderr, "shut d=%d used=%lu handed=%lu syn=%d passing=%u\n", d, slots[s].used, handed(dst[d]), peer_syn[s], slots[s].passing); shutdown(dst[d], SHUT_WR); state[d] = DONE; }
      if (state[d] == COPYING) {
        for (int i = 0; i < 16; i++) {
          if (!held[d]) {
            ssize_t r = recv(src[d], buf[d], sizeof buf[d], 0);
            if (r == 0) {
              // recv reports EOF once ingress_msg is empty and the FIN is in,
              // though passed skbs may still wait on the psock's backlog.
              if (received(src[d]) - 1 != slots[s].used + lb_read[d]) { if (early_eof++ < 5) { int inq = -1; ioctl(src[d], FIONREAD, &inq); uint8_t ti[232]; socklen_t tl = sizeof ti; getsockopt(src[d], IPPROTO_TCP, TCP_INFO, ti, &tl); fprintf(stderr, "early eof d=%d received=%lu used=%lu read=%lu passing=%u inq=%d state=%u\n", d, received(src[d]), slots[s].used, lb_read[d], slots[s].passing, inq, ti[0]); } retry = 1; break; }
              shutdown(dst[d], SHUT_WR); state[d] = DONE; break;
            }
            if (r < 0) { if (errno != EAGAIN) { broken = 1; perror("recv"); } break; }
            lb_read[d] += r;
            held[d] = r; off[d] = 0;
          }
          ssize_t w = send(dst[d], buf[d] + off[d], held[d], MSG_NOSIGNAL);
          if (w < 0) { if (errno != EAGAIN) { broken = 1; perror("send"); } break; }
          off[d] += w; held[d] -= w;
          if (held[d]) break;
        }
      }
    }
  }
  if (broken) { struct linger lg = { 1, 0 }; setsockopt(c, SOL_SOCKET, SO_LINGER, &lg, sizeof lg); setsockopt(b, SOL_SOCKET, SO_LINGER, &lg, sizeof lg); }
  delete(slotmap_fd, &kc); delete(slotmap_fd, &kb);
  close(c); close(b); close(efd);
  return 0;
}

int main(int argc, char **argv) {
  int port = atoi(argv[1]); nback = argc - 2; for (int i = 0; i < nback; i++) bports[i] = atoi(argv[i + 2]);
  sockhash = mkmap(BPF_MAP_TYPE_SOCKHASH, 8, 4, 65536, 0);
  sockhash_b = mkmap(BPF_MAP_TYPE_SOCKHASH, 8, 4, 65536, 0);
  slotmap_fd = mkmap(BPF_MAP_TYPE_HASH, 8, 4, MAXSLOTS, 0);
  slots_fd = mkmap(BPF_MAP_TYPE_ARRAY, 4, sizeof(struct slot), MAXSLOTS, BPF_F_MMAPABLE);
  rb_fd = mkmap(BPF_MAP_TYPE_RINGBUF, 0, 0, 1 << 16, 0);
  slots = mmap(0, MAXSLOTS * sizeof(struct slot), PROT_READ | PROT_WRITE, MAP_SHARED, slots_fd, 0);
  if (slots == MAP_FAILED) { perror("slots mmap"); return 1; }
  int prog = load_prog();
  union bpf_attr a; memset(&a, 0, sizeof a); a.target_fd = sockhash; a.attach_bpf_fd = prog; a.attach_type = BPF_SK_SKB_VERDICT;
  if (bpf(BPF_PROG_ATTACH, &a)) { perror("attach"); return 1; }
  pthread_t t; pthread_create(&t, 0, ringbuf_thread, 0);
  int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
  setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(port) }; sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (bind(l, (void *)&sa, sizeof sa) || listen(l, 1024)) { perror("listen"); return 1; }
  fprintf(stderr, "listening on %d\n", port);
  for (;;) {
    int c = accept(l, 0, 0); if (c < 0) continue;
    pthread_attr_t at; pthread_attr_init(&at); pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&at, 1 << 17);
    pthread_create(&t, &at, conn, (void *)(intptr_t)c);
  }
}
