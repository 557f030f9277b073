#!/bin/sh
# The compiler of the train image's prebuilt ops (docker/train.Dockerfile, builder stage `ops` only), on PATH ahead of
# the real one under the names the build may call (c++, g++, gcc, cc and the <arch>-linux-gnu- names). DeepSpeed
# compiles its CPU ops (cpu_adam: CPUOpBuilder on every accelerator, CUDA's too) with -march=native and the build
# host's SIMD width (deepspeed/ops/op_builder/builder.py: OpBuilder.cpu_arch always answers -march=native on x86_64,
# OpBuilder.simd_width -D__AVX512__ where the host has AVX-512; cpu/builder.py CPUOpBuilder.cxx_args puts both in the
# extension's own compile flags, after CFLAGS, and DeepSpeed 0.19.8 reads no variable to change them): right for a
# just-in-time build on the machine that runs it, wrong for an image that runs elsewhere (AVX-512 code on a node
# without it dies of SIGILL). On x86_64 those two flags become a baseline every node has: -march=$DS_CPU_ARCH (default
# x86-64-v3: AVX2, FMA, F16C; Haswell / Zen and newer) and -D__AVX256__. Everything else passes through unchanged; on
# other machines everything passes through (not built or checked here).
# PORTABLE_CXX_LOG  a file: each call that had a flag rewritten appends "NAME: ARGS" (the train build checks it).
self_dir=$(cd "$(dirname "$0")" && pwd)
name=$(basename "$0")
real=""
IFS_save=$IFS; IFS=:
for d in $PATH; do
    [ "$d" = "$self_dir" ] && continue
    if [ -x "$d/$name" ]; then real="$d/$name"; break; fi
done
IFS=$IFS_save
[ -n "$real" ] || { echo "portable-cxx: no $name on PATH besides $self_dir" >&2; exit 127; }
[ "$(uname -m)" = x86_64 ] || exec "$real" "$@"
rewrote=""
for a do
    shift
    case "$a" in
        -march=native) a="-march=${DS_CPU_ARCH:-x86-64-v3}"; rewrote=1 ;;
        -D__AVX512__) a="-D__AVX256__"; rewrote=1 ;;
    esac
    set -- "$@" "$a"
done
if [ -n "$rewrote" ] && [ -n "${PORTABLE_CXX_LOG:-}" ]; then
    echo "$name: $*" >>"$PORTABLE_CXX_LOG"
fi
exec "$real" "$@"
