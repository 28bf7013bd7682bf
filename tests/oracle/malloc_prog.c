/* The exec-mode fixture program: uses malloc, free and printf, has global data of its own,
 * and reads libc's data object `stdout` (a COPY relocation when linked -no-pie). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int table[4] = {1, 2, 3, 4};
int *table_end = &table[4];

int main(void)
{
    char *text = malloc(32);
    if (text == NULL)
        return 1;
    strcpy(text, "hello");
    printf("%s %d\n", text, table[2] + (int)(table_end - table));
    fputs("done\n", stdout);
    free(text);
    return 0;
}
