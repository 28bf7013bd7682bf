/* The oracle for loader/tls.py: what glibc's ld.so made of a process's TLS.

   Prints one JSON object per line. First the startup image ("step": "startup"), then one
   line per command of argv:
     open PATH     dlopen(PATH, RTLD_NOW); an error is reported as "error"
     close PATH    dlclose the handle of an earlier "open PATH"
     touch PATH F  call function F of PATH (allocates that module's dynamic TLS block)
     thread        the same report from a new thread (on a stack of its own, so that its
                   TCB and DTV are made afresh)
   Each report lists, in link-map order (dl_iterate_phdr's), every object's path, TLS module
   id and tp - dlpi_tls_data (null when the block is not allocated in this thread), the
   static TLS size and alignment (ld.so's _dl_get_tls_static_info) and the thread's DTV:
   its length (dtv[-1]), generation (dtv[0]) and each entry's pointer, as tp - pointer
   (null for glibc's unallocated marker). */

#define _GNU_SOURCE
#include <dlfcn.h>
#include <link.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

__attribute__((used, aligned(16))) static __thread int main_tls[5] = {1, 2, 3, 4, 5};

typedef union { size_t counter; struct { void *val; void *to_free; } pointer; } dtv_t;

static char exe[4096];

static void print_block(const unsigned char *data, size_t n)
{
    printf(", \"block\": \"");
    for (size_t i = 0; i < n; i++)
        printf("%02x", data[i]);
    printf("\"");
}

static int print_object(struct dl_phdr_info *info, size_t size, void *first)
{
    (void)size;
    char *tp = __builtin_thread_pointer();
    const char *name = info->dlpi_name[0] ? info->dlpi_name : exe;
    printf("%s{\"path\": \"%s\", \"modid\": %zu, \"tp_offset\": ", *(int *)first ? "" : ", ",
           name, info->dlpi_tls_modid);
    *(int *)first = 0;
    if (info->dlpi_tls_data == NULL) {
        printf("null}");
        return 0;
    }
    printf("%ld", (long)(tp - (char *)info->dlpi_tls_data));
    for (int i = 0; i < info->dlpi_phnum; i++)
        if (info->dlpi_phdr[i].p_type == PT_TLS)
            print_block(info->dlpi_tls_data, info->dlpi_phdr[i].p_memsz);
    printf("}");
    return 0;
}

static void print_dtv(void)
{
    char *tp = __builtin_thread_pointer();
    dtv_t *dtv = ((dtv_t **)tp)[1];
    printf(", \"tcb\": [%ld, %ld], \"dtv_len\": %zu, \"dtv_gen\": %zu, \"dtv\": [",
           (long)(((char **)tp)[0] - tp), (long)(((char **)tp)[2] - tp),
           dtv[-1].counter, dtv[0].counter);
    for (size_t i = 1; i <= dtv[-1].counter; i++) {
        void *val = dtv[i].pointer.val;
        if (val == (void *)-1l)
            printf("%s\"unallocated\"", i > 1 ? ", " : "");
        else if (val == NULL)
            printf("%snull", i > 1 ? ", " : "");
        else
            printf("%s%ld", i > 1 ? ", " : "", (long)(tp - (char *)val));
    }
    printf("]");
}

static void report(const char *step, const char *error)
{
    size_t size = 0, align = 0;
    void (*info)(size_t *, size_t *) = (void (*)(size_t *, size_t *))
        dlsym(RTLD_DEFAULT, "_dl_get_tls_static_info");
    if (info)
        info(&size, &align);
    printf("{\"step\": \"%s\", \"static_size\": %zu, \"static_align\": %zu", step, size, align);
    if (error)
        printf(", \"error\": \"%s\"", error);
    print_dtv();
    printf(", \"objects\": [");
    int first = 1;
    dl_iterate_phdr(print_object, &first);
    printf("]}\n");
    fflush(stdout);
}

static void *thread_report(void *arg)
{
    report(arg, NULL);
    return NULL;
}

#define MAX_OPEN 64
static const char *opened[MAX_OPEN];
static void *handles[MAX_OPEN];

static int run(char **argv)
{
    if (!strcmp(argv[0], "open")) {
        void *h = dlopen(argv[1], RTLD_NOW);
        for (int i = 0; h && i < MAX_OPEN; i++)
            if (!opened[i]) { opened[i] = argv[1]; handles[i] = h; break; }
        report("open", h ? NULL : "dlopen failed");
        return 2;
    }
    if (!strcmp(argv[0], "close")) {
        for (int i = 0; i < MAX_OPEN; i++)
            if (opened[i] && !strcmp(opened[i], argv[1])) {
                dlclose(handles[i]);
                opened[i] = NULL;
                break;
            }
        report("close", NULL);
        return 2;
    }
    if (!strcmp(argv[0], "touch")) {
        void *h = dlopen(argv[1], RTLD_NOW | RTLD_NOLOAD);
        void *(*fn)(void) = (void *(*)(void))dlsym(h, argv[2]);
        fn();
        dlclose(h);
        report("touch", NULL);
        return 3;
    }
    if (!strcmp(argv[0], "thread")) {
        /* A stack of its own, never freed: glibc reuses a joined thread's cached stack with
           its old DTV, and the report is about a DTV made fresh. */
        enum { STACK = 1 << 20 };
        void *stack = NULL;
        pthread_attr_t attr;
        pthread_t t;
        if (posix_memalign(&stack, 1 << 16, STACK) || pthread_attr_init(&attr)
            || pthread_attr_setstack(&attr, stack, STACK)
            || pthread_create(&t, &attr, thread_report, "thread"))
            exit(3);
        pthread_join(t, NULL);
        return 1;
    }
    fprintf(stderr, "unknown command %s\n", argv[0]);
    exit(2);
}

int main(int argc, char **argv)
{
    (void)argc;
    if (readlink("/proc/self/exe", exe, sizeof exe - 1) < 0)
        return 1;
    report("startup", NULL);
    for (char **arg = argv + 1; *arg; )
        arg += run(arg);
    return main_tls[0] - 1;
}
