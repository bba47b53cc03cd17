/* storm.c - resume-storm load client and in-memory SSE ceiling server, single-threaded epoll.
 *
 * Client mode: opens C connections at once to a loopback target; connection i sends
 *   GET <path i mod P> HTTP/1.1 with "Last-Event-ID: <L>" (and any -H headers), decodes the
 * response body (chunked, content-length or close-delimited), parses SSE incrementally (events end
 * at a blank line, lines end in \n or \r\n, fields id/event/data, comments ignored), counts events by
 * name (metadata / the data event name / other), checks that every event has an id and that ids
 * strictly increase, and records TTFE = connect start -> first complete SSE event.
 * A client is "exact" when it got HTTP 200, exactly N data events, M metadata events (unless -m -1),
 * no other events, ids strictly increasing, and a clean end of the body (terminal chunk, or
 * content-length reached; a close-delimited body counts as clean but is reported).
 * Prints JSON on stdout and a one-line summary on stderr; exits 1 unless every client is exact.
 *
 *   storm -u http://127.0.0.1:PORT (-f PATHS_FILE | -P PATH) [-c 100] [-n 2000] [-m 1] [-e custom]
 *         [-L -1] [-i int|seq|seq-nondecreasing] [-H 'Name: value']... [-k Name] [-t 120]
 *     -k Name: every client also sends "Name: client-<i>" (a header value of its own).
 *     -i int: ids must be decimal integers (the gateway); -i seq: "<ms>-<seq>" or integers, compared
 *     as pairs (LangGraph's stream ids); -i seq-nondecreasing: the same, but an id may repeat the previous
 *     one (langgraph_runtime_inmem stamps "<ms>-0", so events of the same millisecond share an id).
 *     Repeated ids are counted (id_repeats) in every mode.
 *
 * Serve mode (the ceiling): answers every GET with one pre-built response: 200 text/event-stream,
 * chunked (64 KiB chunks), one metadata event then N "custom" events whose data is S bytes, each
 * with an integer id, framed like the gateway frames them ("event: ..\ndata: ..\nid: ..\n\n").
 *   storm serve [-p 0] [-n 2000] [-s 200] [-m 1] [-T 3600]
 * Binds 127.0.0.1 only; prints "port N" on stdout once listening; runs until -T seconds or SIGTERM.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define RBUF (256 * 1024)

static int64_t now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

static void raise_nofile(long need) {
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) != 0) return;
  if ((long)rl.rlim_cur < need) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    getrlimit(RLIMIT_NOFILE, &rl);
  }
  if ((long)rl.rlim_cur < need) {
    fprintf(stderr, "RLIMIT_NOFILE %ld < %ld needed\n", (long)rl.rlim_cur, need);
    exit(2);
  }
}

/* host is loopback: 127.0.0.0/8 or "localhost" (resolved to 127.0.0.1). */
static int loopback_addr(const char *host, struct in_addr *out) {
  if (strcmp(host, "localhost") == 0) host = "127.0.0.1";
  if (inet_pton(AF_INET, host, out) != 1) return 0;
  return (ntohl(out->s_addr) >> 24) == 127;
}

/* ------------------------------------------------------------------------------------------- */
/* client                                                                                        */

enum { CONNECTING, SENDING, HEADERS, BODY, DONE };
enum { CH_SIZE, CH_DATA, CH_CRLF, CH_TRAILER, CH_END };
enum { E_CONNECT, E_STATUS, E_INCOMPLETE, E_TIMEOUT, E_PROTOCOL, E_ID, E_COUNT, E_N };
static const char *ename[E_N] = {"connect", "http_status", "incomplete", "timeout", "protocol", "ids", "count"};

typedef struct {
  int fd, phase, path;
  int chunked, ch_state, close_delim;
  long long clen, ch_left;
  int reqoff, reqlen, status;
  char *req;
  char hdr[16384]; int hlen;
  char chl[128]; int chlen;
  char *line; size_t llen, lcap;          /* partial SSE line carried between reads */
  int ev_has, ev_kind, ev_hasid, ev_badid; /* current event: any field, kind (0 message/other, 1 meta, 2 data) */
  unsigned long long ev_a, ev_b;          /* its id as a pair (a, b): "a" or "a-b" */
  unsigned long long last_a, last_b; int have_last;
  long events, metas, datas, others;
  long long bytes;
  int err; char errmsg[120];
  int64_t t_start, t_first, t_last, t_end;
} conn;

static long C = 100, N = 2000, M = 1, TMO = 120;
static const char *EVNAME = "custom";
static int ID_SEQ = 0, ID_NONDECR = 0;
static long long id_repeats;
static int64_t t_last_event;
static conn *conns;
static char **paths; static int npaths;
static const char *KEYHDR;
static int epfd;
static long open_conns;
static long long errors[E_N];
static long close_delimited;

static void set_err(conn *c, int kind, const char *fmt, const char *a, long long b) {
  if (c->err) return;
  c->err = kind + 1;
  snprintf(c->errmsg, sizeof c->errmsg, fmt, a, b);
}

static void finish(conn *c) {
  if (c->phase == DONE) return;
  c->phase = DONE;
  c->t_end = now_ns();
  if (c->fd >= 0) { close(c->fd); c->fd = -1; }
  open_conns--;
  if (!c->err && (c->llen > 0 || c->ev_has)) set_err(c, E_INCOMPLETE, "%sunterminated event at end%lld", "", 0);
  if (!c->err && (c->datas != N || (M >= 0 && c->metas != M) || c->others != 0)) {
    char buf[100];
    snprintf(buf, sizeof buf, "%ld data, %ld metadata, %ld other events", c->datas, c->metas, c->others);
    set_err(c, E_COUNT, "%s%.0lld", buf, 0);
  }
  if (c->err) errors[c->err - 1]++;
}

static void fail(conn *c, int kind, const char *fmt, const char *a, long long b) {
  set_err(c, kind, fmt, a, b);
  finish(c);
}

static int parse_id(const char *s, size_t n, unsigned long long *a, unsigned long long *b) {
  size_t i = 0; unsigned long long x = 0, y = 0;
  if (n == 0 || n > 40) return 0;
  for (; i < n && s[i] >= '0' && s[i] <= '9'; i++) x = x * 10 + (unsigned)(s[i] - '0');
  if (i == 0) return 0;
  if (i < n) {
    if (!ID_SEQ || s[i] != '-' || i + 1 == n) return 0;
    size_t j = ++i;
    for (; i < n && s[i] >= '0' && s[i] <= '9'; i++) y = y * 10 + (unsigned)(s[i] - '0');
    if (i != n || i == j) return 0;
  }
  *a = x; *b = y;
  return 1;
}

static void dispatch(conn *c) {
  c->events++;
  c->t_last = now_ns();
  if (c->ev_kind == 1) c->metas++; else if (c->ev_kind == 2) c->datas++; else c->others++;
  if (c->events == 1) c->t_first = now_ns();
  if (!c->err) {
    if (!c->ev_hasid) set_err(c, E_ID, "%sevent %lld has no id", "", c->events);
    else if (c->ev_badid) set_err(c, E_ID, "%sevent %lld has a malformed id", "", c->events);
    else if (c->have_last && (c->ev_a < c->last_a || (c->ev_a == c->last_a && c->ev_b < c->last_b)))
      set_err(c, E_ID, "%sid of event %lld decreases", "", c->events);
    else if (c->have_last && c->ev_a == c->last_a && c->ev_b == c->last_b && !ID_NONDECR)
      set_err(c, E_ID, "%sid of event %lld repeats the previous one", "", c->events);
  }
  if (c->ev_hasid && !c->ev_badid && c->have_last && c->ev_a == c->last_a && c->ev_b == c->last_b) id_repeats++;
  if (c->ev_hasid && !c->ev_badid) { c->last_a = c->ev_a; c->last_b = c->ev_b; c->have_last = 1; }
  c->ev_has = c->ev_kind = c->ev_hasid = c->ev_badid = 0;
}

static void sse_line(conn *c, const char *s, size_t n) {
  if (n && s[n - 1] == '\r') n--;
  if (n == 0) { if (c->ev_has) dispatch(c); return; }
  if (s[0] == ':') return;
  const char *colon = memchr(s, ':', n);
  size_t fl = colon ? (size_t)(colon - s) : n;
  const char *v = colon ? colon + 1 : s + n;
  size_t vl = (size_t)(s + n - v);
  if (vl && *v == ' ') { v++; vl--; }
  if (fl == 5 && memcmp(s, "event", 5) == 0) {
    c->ev_has = 1;
    if (vl == 8 && memcmp(v, "metadata", 8) == 0) c->ev_kind = 1;
    else if (vl == strlen(EVNAME) && memcmp(v, EVNAME, vl) == 0) c->ev_kind = 2;
    else c->ev_kind = 0;
  } else if (fl == 4 && memcmp(s, "data", 4) == 0) {
    c->ev_has = 1;
  } else if (fl == 2 && memcmp(s, "id", 2) == 0) {
    c->ev_has = 1;
    c->ev_hasid = 1;
    c->ev_badid = !parse_id(v, vl, &c->ev_a, &c->ev_b);
  }
  /* retry and unknown fields are ignored, as the SSE spec says */
}

static void sse_feed(conn *c, const char *p, size_t n) {
  while (n) {
    const char *nl = memchr(p, '\n', n);
    if (!nl) {
      if (c->llen + n > c->lcap) {
        c->lcap = (c->llen + n) * 2;
        c->line = realloc(c->line, c->lcap);
      }
      memcpy(c->line + c->llen, p, n);
      c->llen += n;
      return;
    }
    size_t k = (size_t)(nl - p);
    if (c->llen) {
      if (c->llen + k > c->lcap) {
        c->lcap = (c->llen + k) * 2;
        c->line = realloc(c->line, c->lcap);
      }
      memcpy(c->line + c->llen, p, k);
      sse_line(c, c->line, c->llen + k);
      c->llen = 0;
    } else {
      sse_line(c, p, k);
    }
    p += k + 1; n -= k + 1;
  }
}

/* Body bytes; returns -1 once the connection is finished. */
static int body_feed(conn *c, const char *p, size_t n) {
  c->bytes += (long long)n;
  if (!c->chunked) {
    if (c->clen >= 0) {
      if ((long long)n > c->clen) { fail(c, E_PROTOCOL, "%sbody longer than content-length%lld", "", 0); return -1; }
      c->clen -= (long long)n;
    }
    sse_feed(c, p, n);
    if (c->clen == 0) { finish(c); return -1; }
    return 0;
  }
  while (n) {
    switch (c->ch_state) {
    case CH_SIZE:
    case CH_TRAILER:
    case CH_CRLF: {
      const char *nl = memchr(p, '\n', n);
      size_t k = nl ? (size_t)(nl - p) : n;
      if (c->chlen + k >= sizeof c->chl) { fail(c, E_PROTOCOL, "%schunk line too long%lld", "", 0); return -1; }
      memcpy(c->chl + c->chlen, p, k);
      c->chlen += (int)k;
      if (!nl) return 0;
      p += k + 1; n -= k + 1;
      int l = c->chlen;
      c->chlen = 0;
      if (l && c->chl[l - 1] == '\r') l--;
      c->chl[l] = 0;
      if (c->ch_state == CH_CRLF) {
        if (l != 0) { fail(c, E_PROTOCOL, "%sno CRLF after chunk data%lld", "", 0); return -1; }
        c->ch_state = CH_SIZE;
      } else if (c->ch_state == CH_TRAILER) {
        if (l == 0) { c->ch_state = CH_END; finish(c); return -1; }
      } else {
        char *end;
        errno = 0;
        long long sz = strtoll(c->chl, &end, 16);
        if (end == c->chl || errno || sz < 0 || (*end && *end != ';' && *end != ' ')) {
          fail(c, E_PROTOCOL, "bad chunk size line '%.60s'%.0lld", c->chl, 0);
          return -1;
        }
        if (sz == 0) c->ch_state = CH_TRAILER;
        else { c->ch_left = sz; c->ch_state = CH_DATA; }
      }
      break;
    }
    case CH_DATA: {
      size_t k = (size_t)c->ch_left < n ? (size_t)c->ch_left : n;
      sse_feed(c, p, k);
      p += k; n -= k;
      c->ch_left -= (long long)k;
      if (c->ch_left == 0) c->ch_state = CH_CRLF;
      break;
    }
    default:
      fail(c, E_PROTOCOL, "%sbytes after the terminal chunk%lld", "", 0);
      return -1;
    }
  }
  return 0;
}

static int header_value(const char *hdr, const char *name, char *out, size_t outl) {
  size_t nl = strlen(name);
  const char *p = strstr(hdr, "\n");
  while (p) {
    p++;
    if (strncasecmp(p, name, nl) == 0 && p[nl] == ':') {
      const char *v = p + nl + 1;
      while (*v == ' ' || *v == '\t') v++;
      size_t k = strcspn(v, "\r\n");
      if (k >= outl) k = outl - 1;
      memcpy(out, v, k);
      out[k] = 0;
      return 1;
    }
    p = strchr(p, '\n');
  }
  return 0;
}

/* Header bytes; returns -1 once the connection is finished. */
static int headers_feed(conn *c, const char *p, size_t n) {
  size_t room = sizeof c->hdr - 1 - (size_t)c->hlen;
  size_t take = n < room ? n : room;
  memcpy(c->hdr + c->hlen, p, take);
  int old = c->hlen;
  c->hlen += (int)take;
  c->hdr[c->hlen] = 0;
  char *end = strstr(c->hdr, "\r\n\r\n");
  int sep = 4;
  if (!end) { end = strstr(c->hdr, "\n\n"); sep = 2; }
  if (!end) {
    if (take < n || c->hlen >= (int)sizeof c->hdr - 1) { fail(c, E_PROTOCOL, "%sresponse headers too long%lld", "", 0); return -1; }
    return 0;
  }
  size_t hend = (size_t)(end - c->hdr) + (size_t)sep;
  *end = 0;
  if (sscanf(c->hdr, "HTTP/1.%*d %d", &c->status) != 1) { fail(c, E_PROTOCOL, "%sbad status line%lld", "", 0); return -1; }
  if (c->status != 200) { fail(c, E_STATUS, "%sHTTP status %lld", "", c->status); return -1; }
  char v[128];
  c->clen = -1;
  if (header_value(c->hdr, "Transfer-Encoding", v, sizeof v) && strcasestr(v, "chunked")) c->chunked = 1;
  else if (header_value(c->hdr, "Content-Length", v, sizeof v)) c->clen = atoll(v);
  else c->close_delim = 1;
  c->phase = BODY;
  size_t used = hend - (size_t)old;
  if (used < n) return body_feed(c, p + used, n - used);
  if (!c->chunked && c->clen == 0) { finish(c); return -1; }
  return 0;
}

static void on_eof(conn *c) {
  if (c->phase == BODY && c->close_delim) { close_delimited++; finish(c); return; }
  fail(c, E_INCOMPLETE, "%sconnection closed before the end of the response (%lld events)", "", c->events);
}

static void send_req(conn *c) {
  const char *r = c->req; int rl = c->reqlen;
  while (c->reqoff < rl) {
    ssize_t w = send(c->fd, r + c->reqoff, (size_t)(rl - c->reqoff), MSG_NOSIGNAL);
    if (w < 0) {
      if (errno == EAGAIN) return;
      fail(c, E_CONNECT, "send: %s%.0lld", strerror(errno), 0);
      return;
    }
    c->reqoff += (int)w;
  }
  c->phase = HEADERS;
  struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
  epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
}

static int cmp_i64(const void *a, const void *b) {
  int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
  return x < y ? -1 : x > y;
}

static double pct(const int64_t *v, size_t n, double p) {
  if (!n) return -1;
  size_t i = (size_t)(p * (double)(n - 1) + 0.5);
  if (i >= n) i = n - 1;
  return (double)v[i] / 1e6;
}

static void json_str(const char *s) {
  putchar('"');
  for (; *s; s++) {
    if (*s == '"' || *s == '\\') printf("\\%c", *s);
    else if ((unsigned char)*s < 0x20) printf("\\u%04x", *s);
    else putchar(*s);
  }
  putchar('"');
}

static int client_main(int argc, char **argv) {
  const char *url = NULL, *pfile = NULL, *lastid = "-1";
  char extra[4096] = "";
  char **ppaths = NULL; int nppaths = 0;
  int o;
  while ((o = getopt(argc, argv, "u:f:P:c:n:m:e:L:i:H:k:t:")) != -1) {
    switch (o) {
    case 'u': url = optarg; break;
    case 'f': pfile = optarg; break;
    case 'P': ppaths = realloc(ppaths, sizeof(char *) * (size_t)(nppaths + 1)); ppaths[nppaths++] = optarg; break;
    case 'c': C = atol(optarg); break;
    case 'n': N = atol(optarg); break;
    case 'm': M = atol(optarg); break;
    case 'e': EVNAME = optarg; break;
    case 'L': lastid = optarg; break;
    case 'i':
      ID_SEQ = strncmp(optarg, "seq", 3) == 0;
      ID_NONDECR = strcmp(optarg, "seq-nondecreasing") == 0;
      if (strcmp(optarg, "int") && strcmp(optarg, "seq") && !ID_NONDECR) goto usage;
      break;
    case 'H':
      if (strlen(extra) + strlen(optarg) + 3 >= sizeof extra || strpbrk(optarg, "\r\n")) goto usage;
      strcat(extra, optarg); strcat(extra, "\r\n");
      break;
    case 'k': KEYHDR = optarg; if (strpbrk(optarg, ": \r\n") || strlen(optarg) > 100) goto usage; break;
    case 't': TMO = atol(optarg); break;
    default: goto usage;
    }
  }
  if (!url || (!pfile && !nppaths) || C < 1 || N < 0 || TMO < 1) {
  usage:
    fprintf(stderr, "usage: storm -u http://127.0.0.1:PORT (-f PATHS | -P PATH...) [-c C] [-n N] [-m M] [-e custom] "
                    "[-L -1] [-i int|seq|seq-nondecreasing] [-H 'Name: value']... [-k Name] [-t timeout_s]\n"
                    "       storm serve [-p PORT] [-n N] [-s SIZE] [-m M] [-T lifetime_s]\n");
    return 2;
  }
  char host[256]; int port = 80;
  if (strncmp(url, "http://", 7) != 0) { fprintf(stderr, "only http:// targets\n"); return 2; }
  const char *h = url + 7;
  size_t hl = strcspn(h, ":/");
  if (hl >= sizeof host) return 2;
  memcpy(host, h, hl); host[hl] = 0;
  if (h[hl] == ':') port = atoi(h + hl + 1);
  struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
  if (!loopback_addr(host, &sa.sin_addr)) { fprintf(stderr, "refusing non-loopback target %s\n", host); return 2; }

  if (pfile) {
    FILE *f = fopen(pfile, "r");
    if (!f) { perror(pfile); return 2; }
    char buf[2048];
    while (fgets(buf, sizeof buf, f)) {
      buf[strcspn(buf, "\r\n")] = 0;
      if (!*buf) continue;
      paths = realloc(paths, sizeof(char *) * (size_t)(npaths + 1));
      paths[npaths++] = strdup(buf);
    }
    fclose(f);
  }
  for (int i = 0; i < nppaths; i++) {
    paths = realloc(paths, sizeof(char *) * (size_t)(npaths + 1));
    paths[npaths++] = ppaths[i];
  }
  if (!npaths) { fprintf(stderr, "no paths\n"); return 2; }
  for (int i = 0; i < npaths; i++)
    if (paths[i][0] != '/' || strpbrk(paths[i], " \r\n") || strlen(paths[i]) > 2048) {
      fprintf(stderr, "bad path %s\n", paths[i]);
      return 2;
    }

  signal(SIGPIPE, SIG_IGN);
  raise_nofile(C + 64);
  conns = calloc((size_t)C, sizeof(conn));
  for (long i = 0; i < C; i++) { /* requests built before the clock starts */
    conn *c = &conns[i];
    char key[200] = "";
    c->path = (int)(i % npaths);
    if (KEYHDR) snprintf(key, sizeof key, "%s: client-%ld\r\n", KEYHDR, i);
    c->req = malloc(8192);
    c->reqlen = snprintf(c->req, 8192,
                         "GET %s HTTP/1.1\r\nHost: %s:%d\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n"
                         "Last-Event-ID: %s\r\n%s%s\r\n", paths[c->path], host, port, lastid, extra, key);
    if (c->reqlen >= 8192) { fprintf(stderr, "request too long\n"); return 2; }
  }
  epfd = epoll_create1(0);
  char *rbuf = malloc(RBUF);
  int64_t deadline = now_ns() + (int64_t)TMO * 1000000000LL;

  /* all connections at once */
  int64_t t0 = now_ns();
  open_conns = C;
  for (long i = 0; i < C; i++) {
    conn *c = &conns[i];
    c->phase = CONNECTING;
    c->t_start = now_ns();
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) { fail(c, E_CONNECT, "socket: %s%.0lld", strerror(errno), 0); continue; }
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(c->fd, (struct sockaddr *)&sa, sizeof sa) < 0 && errno != EINPROGRESS) {
      fail(c, E_CONNECT, "connect: %s%.0lld", strerror(errno), 0);
      continue;
    }
    struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = c};
    epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev);
  }

  struct epoll_event evs[512];
  while (open_conns > 0) {
    int64_t left = deadline - now_ns();
    if (left <= 0) break;
    int ms = (int)(left / 1000000) + 1;
    int k = epoll_wait(epfd, evs, 512, ms > 1000 ? 1000 : ms);
    if (k < 0) { if (errno == EINTR) continue; perror("epoll_wait"); break; }
    for (int j = 0; j < k; j++) {
      conn *c = evs[j].data.ptr;
      if (c->phase == DONE) continue;
      if (c->phase == CONNECTING) {
        int e = 0; socklen_t el = sizeof e;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &e, &el);
        if (e) { fail(c, E_CONNECT, "connect: %s%.0lld", strerror(e), 0); continue; }
        c->phase = SENDING;
      }
      if (c->phase == SENDING) { send_req(c); continue; }
      ssize_t r = recv(c->fd, rbuf, RBUF, 0);
      if (r < 0) {
        if (errno == EAGAIN || errno == EINTR) continue;
        fail(c, E_INCOMPLETE, "recv: %s (%lld events)", strerror(errno), c->events);
        continue;
      }
      if (r == 0) { on_eof(c); continue; }
      if (c->phase == HEADERS) headers_feed(c, rbuf, (size_t)r);
      else body_feed(c, rbuf, (size_t)r);
    }
  }
  int64_t tnow = now_ns();
  for (long i = 0; i < C; i++)
    if (conns[i].phase != DONE) {
      set_err(&conns[i], E_TIMEOUT, "%stimed out (%lld events)", "", conns[i].events);
      finish(&conns[i]);
      conns[i].t_end = tnow;
    }

  /* results */
  long exact = 0, firsts = 0, min_ev = -1, max_ev = 0;
  long long events = 0, metas = 0, datas = 0, others = 0, bytes = 0;
  int64_t t_last = t0;
  int64_t *ttfe = malloc(sizeof(int64_t) * (size_t)C), *tend = malloc(sizeof(int64_t) * (size_t)C);
  for (long i = 0; i < C; i++) {
    conn *c = &conns[i];
    if (!c->err) exact++;
    events += c->events; metas += c->metas; datas += c->datas; others += c->others; bytes += c->bytes;
    if (min_ev < 0 || c->events < min_ev) min_ev = c->events;
    if (c->events > max_ev) max_ev = c->events;
    if (c->t_first) ttfe[firsts++] = c->t_first - c->t_start;
    tend[i] = c->t_end - t0;
    if (c->t_end > t_last) t_last = c->t_end;
    if (c->t_last > t_last_event) t_last_event = c->t_last;
  }
  qsort(ttfe, (size_t)firsts, sizeof(int64_t), cmp_i64);
  qsort(tend, (size_t)C, sizeof(int64_t), cmp_i64);
  double dur = (double)(t_last - t0) / 1e9;
  double eps = dur > 0 ? (double)events / dur : 0;
  long long nerr = 0;
  for (int e = 0; e < E_N; e++) nerr += errors[e];

  printf("{\"mode\":\"client\",\"url\":");
  json_str(url);
  printf(",\"paths\":%d,\"clients\":%ld,\"exact\":%ld,\"expected_data\":%ld,\"expected_metadata\":%ld,"
         "\"data_event\":", npaths, C, exact, N, M);
  json_str(EVNAME);
  printf(",\"id_mode\":\"%s\",\"events\":%lld,\"events_metadata\":%lld,\"events_data\":%lld,\"events_other\":%lld,"
         "\"events_per_client_min\":%ld,\"events_per_client_max\":%ld,\"body_bytes\":%lld,\"close_delimited\":%ld,"
         "\"duration_s\":%.6f,\"events_per_s\":%.1f,",
         ID_NONDECR ? "seq-nondecreasing" : ID_SEQ ? "seq" : "int", events, metas, datas, others, min_ev, max_ev, bytes, close_delimited, dur, eps);
  printf("\"ttfe_ms\":{\"n\":%ld,\"min\":%.3f,\"p50\":%.3f,\"p90\":%.3f,\"p99\":%.3f,\"max\":%.3f},", firsts,
         pct(ttfe, (size_t)firsts, 0), pct(ttfe, (size_t)firsts, .5), pct(ttfe, (size_t)firsts, .9),
         pct(ttfe, (size_t)firsts, .99), pct(ttfe, (size_t)firsts, 1));
  printf("\"id_repeats\":%lld,\"last_event_ms\":%.3f,", id_repeats, t_last_event ? (double)(t_last_event - t0) / 1e6 : -1.0);
  printf("\"end_ms\":{\"p50\":%.3f,\"p99\":%.3f,\"max\":%.3f},", pct(tend, (size_t)C, .5), pct(tend, (size_t)C, .99),
         pct(tend, (size_t)C, 1));
  printf("\"errors\":{");
  for (int e = 0; e < E_N; e++) printf("%s\"%s\":%lld", e ? "," : "", ename[e], errors[e]);
  printf("},\"error_total\":%lld,\"error_samples\":[", nerr);
  int shown = 0;
  for (long i = 0; i < C && shown < 5; i++)
    if (conns[i].err) {
      char buf[200];
      snprintf(buf, sizeof buf, "client %ld (%s): %s: %s", i, paths[conns[i].path], ename[conns[i].err - 1], conns[i].errmsg);
      if (shown++) putchar(',');
      json_str(buf);
    }
  printf("]}\n");
  fflush(stdout);
  fprintf(stderr, "storm c=%ld: %lld events (%lld data, %lld metadata, %lld other) in %.3f s = %.0f ev/s, "
                  "ttfe p50/p99 %.2f/%.2f ms, exact %ld/%ld, errors %lld\n",
          C, events, datas, metas, others, dur, eps, pct(ttfe, (size_t)firsts, .5), pct(ttfe, (size_t)firsts, .99),
          exact, C, nerr);
  return exact == C ? 0 : 1;
}

/* ------------------------------------------------------------------------------------------- */
/* serve: the ceiling                                                                            */

typedef struct {
  int fd, state; /* 0 reading request, 1 writing */
  char tail[4]; int tl, seen, is_get;
  const char *out; size_t outlen, off;
} sconn;

static volatile sig_atomic_t stop_flag;
static void on_term(int s) { (void)s; stop_flag = 1; }

static char *build_response(long n, long size, long meta, size_t *len) {
  /* body first (unchunked), then framed in 64 KiB chunks */
  size_t cap = (size_t)(n + meta) * (size_t)(size + 128) + 4096, bl = 0;
  char *body = malloc(cap);
  unsigned long long id = 1700000000000000ULL;
  for (long m = 0; m < meta; m++)
    bl += (size_t)sprintf(body + bl, "event: metadata\ndata: {\"run_id\":\"00000000-0000-4000-8000-000000000000\","
                                     "\"attempt\":1}\nid: %llu\n\n", id++);
  for (long i = 0; i < n; i++) {
    int hd = sprintf(body + bl, "event: custom\ndata: {\"i\":%ld,\"of\":%ld,\"pad\":\"", i, n);
    size_t dstart = bl + 13 + 1 + 6; /* "event: custom\n" + "data: " */
    bl += (size_t)hd;
    long have = (long)(bl - dstart) + 2; /* + closing quote and brace */
    for (long k = have; k < size; k++) body[bl++] = 'x';
    bl += (size_t)sprintf(body + bl, "\"}\nid: %llu\n\n", id++);
  }
  const char *head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\nCache-Control: no-store\r\n"
                     "X-Accel-Buffering: no\r\nTransfer-Encoding: chunked\r\n\r\n";
  size_t rcap = strlen(head) + bl + (bl / 65536 + 2) * 16 + 16;
  char *r = malloc(rcap);
  size_t rl = (size_t)sprintf(r, "%s", head);
  for (size_t off = 0; off < bl; off += 65536) {
    size_t k = bl - off < 65536 ? bl - off : 65536;
    rl += (size_t)sprintf(r + rl, "%zx\r\n", k);
    memcpy(r + rl, body + off, k);
    rl += k;
    memcpy(r + rl, "\r\n", 2);
    rl += 2;
  }
  memcpy(r + rl, "0\r\n\r\n", 5);
  rl += 5;
  free(body);
  *len = rl;
  return r;
}

static int serve_main(int argc, char **argv) {
  long port = 0, n = 2000, size = 200, meta = 1, life = 3600;
  int o;
  optind = 2;
  while ((o = getopt(argc, argv, "p:n:s:m:T:")) != -1) {
    switch (o) {
    case 'p': port = atol(optarg); break;
    case 'n': n = atol(optarg); break;
    case 's': size = atol(optarg); break;
    case 'm': meta = atol(optarg); break;
    case 'T': life = atol(optarg); break;
    default: fprintf(stderr, "usage: storm serve [-p PORT] [-n N] [-s SIZE] [-m M] [-T lifetime_s]\n"); return 2;
    }
  }
  if (n < 0 || size < 40 || meta < 0 || port < 0 || port > 65535) { fprintf(stderr, "bad arguments (size >= 40)\n"); return 2; }
  size_t rlen;
  char *resp = build_response(n, size, meta, &rlen);
  static const char bad[] = "HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

  signal(SIGPIPE, SIG_IGN);
  signal(SIGTERM, on_term);
  signal(SIGINT, on_term);
  raise_nofile(4096);
  struct rlimit rl;
  getrlimit(RLIMIT_NOFILE, &rl);
  long maxfd = (long)rl.rlim_cur;
  sconn **tab = calloc((size_t)maxfd, sizeof(sconn *));

  int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  int one = 1;
  setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (bind(ls, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(ls, 4096) < 0) { perror("bind/listen"); return 1; }
  socklen_t sl = sizeof sa;
  getsockname(ls, (struct sockaddr *)&sa, &sl);
  printf("port %d\n", ntohs(sa.sin_port));
  fflush(stdout);
  fprintf(stderr, "storm serve: 127.0.0.1:%d, %ld+%ld events of %ld bytes, response %zu bytes\n", ntohs(sa.sin_port),
          meta, n, size, rlen);

  int ep = epoll_create1(0);
  struct epoll_event ev = {.events = EPOLLIN, .data.fd = ls};
  epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
  int64_t end = now_ns() + (int64_t)life * 1000000000LL;
  struct epoll_event evs[512];
  char buf[16384];
  while (!stop_flag && now_ns() < end) {
    int k = epoll_wait(ep, evs, 512, 500);
    if (k < 0) { if (errno == EINTR) continue; perror("epoll_wait"); break; }
    for (int j = 0; j < k; j++) {
      int fd = evs[j].data.fd;
      if (fd == ls) {
        for (;;) {
          int cfd = accept4(ls, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
          if (cfd < 0) break;
          if (cfd >= maxfd) { close(cfd); continue; }
          setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
          sconn *s = calloc(1, sizeof *s);
          s->fd = cfd;
          tab[cfd] = s;
          struct epoll_event ce = {.events = EPOLLIN, .data.fd = cfd};
          epoll_ctl(ep, EPOLL_CTL_ADD, cfd, &ce);
        }
        continue;
      }
      sconn *s = tab[fd];
      if (!s) continue;
      int closeit = 0;
      if (s->state == 0) {
        ssize_t r = recv(fd, buf, sizeof buf, 0);
        if (r <= 0) {
          if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
          closeit = 1;
        } else {
          /* find the end of the request head ("\r\n\r\n"), across reads; the method is in the first read */
          if (!s->seen) { s->seen = 1; s->is_get = r >= 4 && memcmp(buf, "GET ", 4) == 0; }
          char tmp[4 + sizeof buf];
          memcpy(tmp, s->tail, (size_t)s->tl);
          memcpy(tmp + s->tl, buf, (size_t)r);
          size_t tl = (size_t)s->tl + (size_t)r;
          if (memmem(tmp, tl, "\r\n\r\n", 4)) {
            s->out = s->is_get ? resp : bad;
            s->outlen = s->is_get ? rlen : sizeof bad - 1;
            s->state = 1;
          } else {
            size_t keep = tl < 3 ? tl : 3;
            memcpy(s->tail, tmp + tl - keep, keep);
            s->tl = (int)keep;
          }
        }
      }
      if (!closeit && s->state == 1) {
        while (s->off < s->outlen) {
          ssize_t w = send(fd, s->out + s->off, s->outlen - s->off, MSG_NOSIGNAL);
          if (w < 0) break;
          s->off += (size_t)w;
        }
        if (s->off >= s->outlen) closeit = 1;
        else if (errno == EAGAIN) {
          struct epoll_event ce = {.events = EPOLLOUT, .data.fd = fd};
          epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ce);
        } else closeit = 1;
      }
      if (closeit) {
        close(fd);
        tab[fd] = NULL;
        free(s);
      }
    }
  }
  return 0;
}

int main(int argc, char **argv) {
  if (argc > 1 && strcmp(argv[1], "serve") == 0) return serve_main(argc, argv);
  return client_main(argc, argv);
}
