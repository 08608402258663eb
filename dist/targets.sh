# The ARM targets, in one place (sourced by cross.sh, qemu-smoke.sh and
# qemu-bench.sh):
#
#   . dist/targets.sh; covey_target NAME
#
# NAME: arm64 | aarch64 | aarch64-unknown-linux-gnu
#       armv7 | armv7-unknown-linux-gnueabihf
#       armv6 | armhf | armel | arm-unknown-linux-musleabihf | armv6-unknown-linux-musleabihf
# (armhf and armel as Debian architectures of a Pi: the ARMv6 build, which
# every 32-bit Pi runs.) Sets:
#   triple     the Rust target (the ARMv6 one is a target spec of ours, see cross.sh)
#   short      arm64 | armv7 | armv6, also what `covey compile --target` takes
#   gnu        Debian's cross prefix for that ABI (linker, libc, native Lua):
#              armv6 uses armel's (ARMv5TE code, which an ARM1176 runs)
#   qemu_cpu   qemu-user emulating that Pi's CPU
#   qemu       the same, plus the dynamic loader's root when the build links
#              glibc (the ARMv6 build is static), and the cross glibc's
#              directory as LD_LIBRARY_PATH: once the machine has that
#              architecture's own libc6 (dpkg --add-architecture, as
#              deb-install-test.sh does), the host's ld.so.cache points the
#              cross ld.so at /lib/<triple>/libc.so.6, a different glibc build
#              whose private interface does not match: a program that starts
#              a thread then spins forever in pthread_create
# Returns 2 with a message for an unknown NAME.
covey_target() {
  case "$1" in
    arm64|aarch64|aarch64-unknown-linux-gnu)
      triple=aarch64-unknown-linux-gnu short=arm64 gnu=aarch64-linux-gnu
      # -R 512G: the 39-bit address space of a Pi 3/4 kernel, so the engine
      # picks the memory layout it picks on a real Pi.
      qemu_cpu=(qemu-aarch64-static -R 512G)
      qemu=("${qemu_cpu[@]}" -L "/usr/$gnu" -E "LD_LIBRARY_PATH=/usr/$gnu/lib") ;;
    armv7|armv7-unknown-linux-gnueabihf)
      triple=armv7-unknown-linux-gnueabihf short=armv7 gnu=arm-linux-gnueabihf
      qemu_cpu=(qemu-arm-static -cpu cortex-a7)
      qemu=("${qemu_cpu[@]}" -L "/usr/$gnu" -E "LD_LIBRARY_PATH=/usr/$gnu/lib") ;;
    armv6|armhf|armel|arm-unknown-linux-musleabihf|armv6-unknown-linux-musleabihf)
      triple=armv6-unknown-linux-musleabihf short=armv6 gnu=arm-linux-gnueabi
      qemu_cpu=(qemu-arm-static -cpu arm1176)
      qemu=("${qemu_cpu[@]}") ;;
    *)
      echo "unknown target '$1' (arm64, armv7, armv6 or a Rust triple)" >&2
      return 2 ;;
  esac
}
