/* The glibc oracle's dumper: writes the process image as glibc's loader built it.
 *
 * oracle_dump(path, startup_count) walks dl_iterate_phdr (link-map order) and writes to `path`:
 *   header:  "VMSIMOR1", u64 startup_count (objects present before dlopen; ~0 = all)
 *   per object, in link-map order:
 *     u64 name_len, name bytes (dlpi_name, no NUL), u64 dlpi_addr, u64 dlpi_phnum,
 *     u64 dlpi_tls_modid, the program headers (phnum * sizeof(Elf64_Phdr)),
 *     then for every PT_LOAD with PF_W, in program-header order: its p_memsz bytes
 *     read at dlpi_addr + p_vaddr.
 * All integers little-endian. Only write(2): no stdio, no malloc. Returns 0, or -1 on error.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <link.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

static int write_all(int fd, const void *data, size_t n)
{
    const char *at = data;
    while (n > 0) {
        ssize_t done = write(fd, at, n);
        if (done <= 0)
            return -1;
        at += done;
        n -= (size_t)done;
    }
    return 0;
}

static int write_u64(int fd, uint64_t value)
{
    return write_all(fd, &value, sizeof value);
}

static int dump_object(struct dl_phdr_info *info, size_t size, void *data)
{
    int fd = *(int *)data;
    const char *name = info->dlpi_name ? info->dlpi_name : "";
    (void)size;
    if (write_u64(fd, strlen(name)) || write_all(fd, name, strlen(name))
        || write_u64(fd, info->dlpi_addr) || write_u64(fd, info->dlpi_phnum)
        || write_u64(fd, info->dlpi_tls_modid)
        || write_all(fd, info->dlpi_phdr, info->dlpi_phnum * sizeof(ElfW(Phdr))))
        return -1;
    for (ElfW(Half) i = 0; i < info->dlpi_phnum; i++) {
        const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
        if (ph->p_type == PT_LOAD && (ph->p_flags & PF_W)
            && write_all(fd, (const void *)(info->dlpi_addr + ph->p_vaddr), ph->p_memsz))
            return -1;
    }
    return 0;
}

static int count_object(struct dl_phdr_info *info, size_t size, void *data)
{
    (void)info;
    (void)size;
    ++*(uint64_t *)data;
    return 0;
}

__attribute__((visibility("hidden"))) uint64_t oracle_count_objects(void)
{
    uint64_t n = 0;
    dl_iterate_phdr(count_object, &n);
    return n;
}

__attribute__((visibility("hidden"))) int oracle_dump(const char *path, uint64_t startup_count)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0)
        return -1;
    int bad = write_all(fd, "VMSIMOR1", 8) || write_u64(fd, startup_count)
              || dl_iterate_phdr(dump_object, &fd);
    return close(fd) || bad ? -1 : 0;
}
