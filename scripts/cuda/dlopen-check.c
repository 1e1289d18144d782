/* Loads each shared library named on the command line with dlopen(RTLD_NOW | RTLD_LOCAL), in order, as ONNX
 * Runtime and cuDNN load theirs; a name after `--global` is loaded with RTLD_GLOBAL instead (ONNX Runtime loads
 * libonnxruntime_providers_shared.so so, and the CUDA provider takes its symbols from it). Prints one line per
 * library: "ok <path>" or "FAIL <path>: <dlerror>". RTLD_NOW makes the loader resolve every symbol now, so a
 * missing library or symbol anywhere below the named one fails here instead of at first use. Exit status: the
 * number of failures (0: all loaded). Used by scripts/container-test.sh inside the CUDA image. */
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>

int main(int argc, char **argv) {
    int failures = 0, global = 0;
    setvbuf(stdout, NULL, _IONBF, 0);
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--global") == 0) {
            global = 1;
            continue;
        }
        if (dlopen(argv[i], RTLD_NOW | (global ? RTLD_GLOBAL : RTLD_LOCAL))) {
            printf("ok %s\n", argv[i]);
        } else {
            printf("FAIL %s: %s\n", argv[i], dlerror());
            failures++;
        }
        global = 0;
    }
    return failures > 125 ? 125 : failures;
}
