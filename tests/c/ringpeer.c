/*
 * One end of a blkif ring built on Xen's own io/ring.h and io/blkif.h macros,
 * driven line by line from stdin so a Python test can interleave it with
 * xenlike's ring over one shared page. Every answer is one line on stdout.
 *
 *   front-init | back-init          FRONT/BACK_RING_INIT (front also SHARED_RING_INIT)
 *   put ID OP NSEG SECTOR GREF...   write a request at req_prod_pvt
 *   push-requests                   -> "notify N"
 *   take-requests                   -> "req ID OP NSEG HANDLE SECTOR GREF:F:L ..." per
 *                                      request, then "more N" (final check)
 *   respond ID OP STATUS            write a response at rsp_prod_pvt
 *   push-responses                  -> "notify N"
 *   take-responses                  -> "rsp ID OP STATUS" per response, then "more N"
 *   header                          -> "hdr REQ_PROD REQ_EVENT RSP_PROD RSP_EVENT"
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/mman.h>

#define __XEN_INTERFACE_VERSION__ 0x00040e00
#define xen_mb()  __sync_synchronize()
#define xen_rmb() __sync_synchronize()
#define xen_wmb() __sync_synchronize()
#include <xen/io/ring.h>
#include <xen/io/blkif.h>

static blkif_front_ring_t front;
static blkif_back_ring_t back;

int main(int argc, char **argv)
{
    char line[4096];
    int fd;
    blkif_sring_t *sring;

    if (argc != 2) {
        fprintf(stderr, "usage: ringpeer SHARED_FILE\n");
        return 2;
    }
    fd = open(argv[1], O_RDWR);
    sring = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (fd < 0 || sring == MAP_FAILED) {
        perror("ringpeer");
        return 1;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    while (fgets(line, sizeof(line), stdin)) {
        char *cmd = strtok(line, " \n");
        if (!cmd)
            continue;
        if (!strcmp(cmd, "front-init")) {
            SHARED_RING_INIT(sring);
            FRONT_RING_INIT(&front, sring, 4096);
            printf("ok %u\n", RING_SIZE(&front));
        } else if (!strcmp(cmd, "back-init")) {
            BACK_RING_INIT(&back, sring, 4096);
            printf("ok %u\n", RING_SIZE(&back));
        } else if (!strcmp(cmd, "put")) {
            blkif_request_t *req = RING_GET_REQUEST(&front, front.req_prod_pvt);
            int i;
            memset(req, 0, sizeof(*req));
            req->id = strtoull(strtok(NULL, " "), NULL, 0);
            req->operation = atoi(strtok(NULL, " "));
            req->nr_segments = atoi(strtok(NULL, " "));
            req->sector_number = strtoull(strtok(NULL, " "), NULL, 0);
            req->handle = 51712;
            for (i = 0; i < req->nr_segments; i++) {
                req->seg[i].gref = strtoul(strtok(NULL, " \n"), NULL, 0);
                req->seg[i].first_sect = i % 8;
                req->seg[i].last_sect = 7;
            }
            front.req_prod_pvt++;
            printf("ok\n");
        } else if (!strcmp(cmd, "push-requests")) {
            int notify;
            RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&front, notify);
            printf("notify %d\n", notify);
        } else if (!strcmp(cmd, "take-requests")) {
            int more;
            do {
                while (RING_HAS_UNCONSUMED_REQUESTS(&back)) {
                    blkif_request_t req;
                    int i;
                    RING_COPY_REQUEST(&back, back.req_cons, &req);
                    back.req_cons++;
                    printf("req %llu %u %u %u %llu", (unsigned long long)req.id, req.operation,
                           req.nr_segments, req.handle, (unsigned long long)req.sector_number);
                    for (i = 0; i < req.nr_segments && i < BLKIF_MAX_SEGMENTS_PER_REQUEST; i++)
                        printf(" %u:%u:%u", req.seg[i].gref, req.seg[i].first_sect,
                               req.seg[i].last_sect);
                    printf("\n");
                }
                RING_FINAL_CHECK_FOR_REQUESTS(&back, more);
            } while (more);
            printf("more %d\n", more);
        } else if (!strcmp(cmd, "respond")) {
            blkif_response_t *rsp = RING_GET_RESPONSE(&back, back.rsp_prod_pvt);
            rsp->id = strtoull(strtok(NULL, " "), NULL, 0);
            rsp->operation = atoi(strtok(NULL, " "));
            rsp->status = atoi(strtok(NULL, " \n"));
            back.rsp_prod_pvt++;
            printf("ok\n");
        } else if (!strcmp(cmd, "push-responses")) {
            int notify;
            RING_PUSH_RESPONSES_AND_CHECK_NOTIFY(&back, notify);
            printf("notify %d\n", notify);
        } else if (!strcmp(cmd, "take-responses")) {
            int more;
            do {
                while (RING_HAS_UNCONSUMED_RESPONSES(&front)) {
                    blkif_response_t *rsp = RING_GET_RESPONSE(&front, front.rsp_cons);
                    printf("rsp %llu %u %d\n", (unsigned long long)rsp->id, rsp->operation,
                           rsp->status);
                    front.rsp_cons++;
                }
                RING_FINAL_CHECK_FOR_RESPONSES(&front, more);
            } while (more);
            printf("more %d\n", more);
        } else if (!strcmp(cmd, "header")) {
            printf("hdr %u %u %u %u\n", sring->req_prod, sring->req_event, sring->rsp_prod,
                   sring->rsp_event);
        } else {
            printf("error unknown command %s\n", cmd);
        }
    }
    return 0;
}
