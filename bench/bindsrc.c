/* LD_PRELOAD shim for the benchmark: binds every IPv4 socket to the source address in
 * BENCH_SOURCE_ADDRESS before connect(), so that smtp-source (which has no option for it)
 * connects from, e.g., 127.0.0.2. Built by bench/harness.py (cc -shared) when a harness
 * configuration names a source address. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <sys/socket.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

int connect(int fd, const struct sockaddr *addr, socklen_t len)
{
    static int (*real_connect)(int, const struct sockaddr *, socklen_t);
    const char *src = getenv("BENCH_SOURCE_ADDRESS");

    if (real_connect == 0)
        real_connect = (int (*)(int, const struct sockaddr *, socklen_t)) dlsym(RTLD_NEXT, "connect");
    if (src != 0 && addr != 0 && addr->sa_family == AF_INET) {
        struct sockaddr_in sin = {0};
        int one = 1;

        sin.sin_family = AF_INET;
        if (inet_pton(AF_INET, src, &sin.sin_addr) == 1) {
            (void) setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof(one));
            (void) bind(fd, (struct sockaddr *) &sin, sizeof(sin));
        }
    }
    return real_connect(fd, addr, len);
}
