/*
 * LD_PRELOAD shim: the hypervisor as Xen 4.17's C xenstored sees it at
 * start-up, so the unmodified Debian binary serves its Unix socket on a
 * machine without Xen. Our code; no Xen code is copied here.
 *
 * xenstored opens libxenctrl, libxenevtchn and libxengnttab and reads
 * /proc/xen/xsd_{port,kva} to introduce domain 0 on its ring. Each is
 * answered with just enough: dummy handles, an event channel whose fd never
 * becomes readable, zeroed pages for rings, and a domain list.
 *
 * XSHIM_DOMAINS lists the domids xc_domain_getinfo reports ("0,2,5-9");
 * unset, every domid below DOMID_FIRST_RESERVED exists. xenstored asks it
 * whether a permission names a domain (SET_PERMS owner: ENOENT if not).
 *
 * XSHIM_RINGDIR, if set, makes the ring page of each introduced domain the
 * file DIR/dom<ID>.ring, zeroed at each introduction, so a test can play the
 * guest: write requests into it, read replies out of it.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <xenctrl.h>
#include <xenevtchn.h>
#include <xengnttab.h>

#define FIRST_RESERVED 0x7ff0u

static int domain_exists(uint32_t domid)
{
    const char *list = getenv("XSHIM_DOMAINS");
    char *end;

    if (domid >= FIRST_RESERVED)
        return 0;
    if (!list || domid == 0)
        return 1;
    while (*list) {
        unsigned long first = strtoul(list, &end, 10), last = first;
        if (end == list)
            return 0;
        if (*end == '-')
            last = strtoul(end + 1, &end, 10);
        if (domid >= first && domid <= last)
            return 1;
        list = *end == ',' ? end + 1 : end;
    }
    return 0;
}

static int handle;

xc_interface *xc_interface_open(xentoollog_logger *logger, xentoollog_logger *dombuild,
                                unsigned flags)
{
    return (xc_interface *)&handle;
}

int xc_interface_close(xc_interface *xch) { return 0; }

int xc_domain_getinfo(xc_interface *xch, uint32_t first, unsigned int max, xc_dominfo_t *info)
{
    unsigned int found = 0;

    for (uint32_t domid = first; domid < FIRST_RESERVED && found < max; domid++) {
        if (!domain_exists(domid))
            continue;
        memset(&info[found], 0, sizeof(info[found]));
        info[found].domid = domid;
        info[found].running = 1;
        info[found].xenstore = domid == 0;
        found++;
    }
    return found;
}

xengnttab_handle *xengnttab_open(xentoollog_logger *logger, unsigned flags)
{
    return (xengnttab_handle *)&handle;
}

int xengnttab_close(xengnttab_handle *xgt) { return 0; }

int xengnttab_set_max_grants(xengnttab_handle *xgt, uint32_t count) { return 0; }

static void *zeroed_page(void)
{
    void *page = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    return page == MAP_FAILED ? NULL : page;
}

void *xengnttab_map_grant_ref(xengnttab_handle *xgt, uint32_t domid, uint32_t ref, int prot)
{
    const char *dir = getenv("XSHIM_RINGDIR");
    char path[4096];
    void *page;
    int fd;

    if (!dir)
        return zeroed_page();
    snprintf(path, sizeof(path), "%s/dom%u.ring", dir, domid);
    fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0)
        return NULL;
    if (ftruncate(fd, 4096) < 0) {
        close(fd);
        return NULL;
    }
    page = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    return page == MAP_FAILED ? NULL : page;
}

int xengnttab_unmap(xengnttab_handle *xgt, void *start, uint32_t count)
{
    return munmap(start, count * 4096);
}

/* An event channel handle is the read end of a pipe nobody writes to. */
struct evtchn { int fds[2]; };
static evtchn_port_t next_port = 1;

xenevtchn_handle *xenevtchn_open(xentoollog_logger *logger, unsigned flags)
{
    struct evtchn *channel = calloc(1, sizeof(*channel));

    if (channel && pipe2(channel->fds, O_CLOEXEC) < 0) {
        free(channel);
        return NULL;
    }
    return (xenevtchn_handle *)channel;
}

xenevtchn_handle *xenevtchn_fdopen(xentoollog_logger *logger, int fd, unsigned flags)
{
    return xenevtchn_open(logger, flags);
}

int xenevtchn_close(xenevtchn_handle *xce)
{
    struct evtchn *channel = (struct evtchn *)xce;

    if (channel) {
        close(channel->fds[0]);
        close(channel->fds[1]);
        free(channel);
    }
    return 0;
}

int xenevtchn_fd(xenevtchn_handle *xce) { return ((struct evtchn *)xce)->fds[0]; }

int xenevtchn_notify(xenevtchn_handle *xce, evtchn_port_t port) { return 0; }

xenevtchn_port_or_error_t xenevtchn_bind_virq(xenevtchn_handle *xce, unsigned int virq)
{
    return next_port++;
}

xenevtchn_port_or_error_t xenevtchn_bind_interdomain(xenevtchn_handle *xce, uint32_t domid,
                                                     evtchn_port_t remote)
{
    return next_port++;
}

int xenevtchn_unbind(xenevtchn_handle *xce, evtchn_port_t port) { return 0; }

xenevtchn_port_or_error_t xenevtchn_pending(xenevtchn_handle *xce) { return -1; }

int xenevtchn_unmask(xenevtchn_handle *xce, evtchn_port_t port) { return 0; }

/* /proc/xen/xsd_port: domain 0's store port; /proc/xen/xsd_kva: its ring page. */
static int memfd_holding(const char *text, size_t size)
{
    int fd = memfd_create("xshim", MFD_CLOEXEC);
    size_t length = strlen(text);

    if (fd >= 0 && (ftruncate(fd, size) < 0 || pwrite(fd, text, length, 0) != (ssize_t)length)) {
        close(fd);
        return -1;
    }
    return fd;
}

int open(const char *path, int flags, ...)
{
    static int (*real_open)(const char *, int, ...);
    mode_t mode = 0;

    if (!strcmp(path, "/proc/xen/xsd_port"))
        return memfd_holding("1", 1);
    if (!strcmp(path, "/proc/xen/xsd_kva"))
        return memfd_holding("", 4096);
    if (flags & (O_CREAT | O_TMPFILE)) {
        va_list args;
        va_start(args, flags);
        mode = va_arg(args, mode_t);
        va_end(args);
    }
    if (!real_open)
        real_open = dlsym(RTLD_NEXT, "open");
    return real_open(path, flags, mode);
}
