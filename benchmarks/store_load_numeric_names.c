/* LD_PRELOAD shim for the store server of benchmarks/store_load.py: getnameinfo() with
 * NI_NUMERICHOST, so c10d's per-connection reverse lookups never reach DNS. Without it, on
 * a machine whose resolver drops some queries, the server's event loop freezes 5 s (the
 * resolver timeout) on one accept in ~25: connecting 1024 clients took minutes
 * (docs/BENCHMARKS.md, "Store load at 1024 ranks"). Requests are untouched. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netdb.h>
#include <sys/socket.h>

typedef int (*real_t)(const struct sockaddr *, socklen_t, char *, socklen_t, char *,
                      socklen_t, int);

int getnameinfo(const struct sockaddr *sa, socklen_t salen, char *host, socklen_t hostlen,
                char *serv, socklen_t servlen, int flags) {
  static real_t real = 0;
  if (!real) real = (real_t)dlsym(RTLD_NEXT, "getnameinfo");
  return real(sa, salen, host, hostlen, serv, servlen, flags | NI_NUMERICHOST);
}
