#!/usr/bin/env bash
# Install a covey .deb the way a Raspberry Pi user does, run what it
# installed, then remove and purge it:
#
#   bash dist/deb-install-test.sh DEB
#
# The package's architecture (arm64, armhf, armel) is added to dpkg, so apt
# resolves its dependencies from that architecture (libc6:arm64 for the
# aarch64 build); the binary then runs under qemu-user from the installed
# paths, as the covey system user, with the packaged config — which is what
# the systemd unit starts. Changes this machine's packages: for CI machines
# and throwaway containers.
#
# Checks: `apt install ./covey_*.deb` succeeds; the system user and its
# directories exist; the unit file passes `systemd-analyze verify` (when
# systemd's tools are here; else a loud SKIPPED); the installed node starts
# with the packaged config, runs a Lua script dropped into
# /var/lib/covey/scripts and answers `covey status`; `apt remove` keeps the
# scripts and data; `apt purge` removes them and the user.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
deb="$(realpath "${1:?usage: dist/deb-install-test.sh DEB}")"
arch="$(dpkg-deb --field "$deb" Architecture)"
qemu_cpu=()
if [ "$arch" != "$(dpkg --print-architecture)" ]; then
  . "$root/dist/targets.sh"
  covey_target "$arch"
fi
fail() { echo "FAILED: $*" >&2; [ -f "${log:-}" ] && tail -30 "$log" >&2; exit 1; }

if [ ${#qemu_cpu[@]} -gt 0 ]; then
  dpkg --print-foreign-architectures | grep -qx "$arch" || dpkg --add-architecture "$arch"
  command -v "${qemu_cpu[0]}" >/dev/null || need_qemu=1
fi
bash "$root/dist/apt-update.sh"
[ -z "${need_qemu:-}" ] || apt-get install -y -qq qemu-user-static >/dev/null
# A previous covey (another architecture's package) is replaced, as apt would.
apt-get install -y -qq "$deb" >/dev/null || fail "apt install $deb"
[ "$(dpkg-query -W -f '${Status} ${Architecture}' covey)" = "install ok installed $arch" ] ||
  fail "covey:$arch is not installed"
getent passwd covey >/dev/null || fail "no covey system user"
[ "$(stat -c %U /var/lib/covey/scripts)" = covey ] || fail "/var/lib/covey/scripts not owned by covey"
echo "installed: $(dpkg-query -W -f '${Package} ${Version} ${Architecture}' covey)"

if command -v systemd-analyze >/dev/null; then
  # A container without systemd running can still check the unit's syntax.
  systemd-analyze verify /lib/systemd/system/covey.service 2>&1 | grep -v "Cannot add dependency" |
    grep . && fail "systemd-analyze verify covey.service"
  echo "unit verified"
else
  echo "SKIPPED: systemd-analyze not installed, covey.service not verified" >&2
fi

# The installed node, as the unit runs it (plus: no mDNS: traffic stays on this machine).
log="$(mktemp)"
chmod 0644 "$log"
as_covey=(setpriv --reuid covey --regid covey --init-groups env COVEY_CONFIG=/etc/covey/covey.yaml COVEY_DATA=/var/lib/covey/data
  NO_COLOR=1 "${qemu_cpu[@]}" /usr/bin/covey)
"${as_covey[@]}" run --discovery off --node pi >"$log" 2>&1 &
pid=$!
trap 'kill -9 $pid 2>/dev/null || true; rm -f "$log"' EXIT
printf 'covey.log.info("hello from the package")\n' >/var/lib/covey/scripts/hello.lua
chown covey: /var/lib/covey/scripts/hello.lua
# The aarch64 build compiles the Lua guest at its first start: minutes
# under qemu on a busy machine.
deadline=$((SECONDS + 900))
while [ $SECONDS -lt $deadline ]; do
  grep -q "hello from the package" "$log" && break
  kill -0 $pid 2>/dev/null || fail "the installed node exited"
  sleep 0.2
done
grep -q "hello from the package" "$log" || fail "the installed node did not run hello.lua"
status="$("${as_covey[@]}" status)" || fail "covey status failed"
grep -q hello <<<"$status" || fail "covey status does not list hello: $status"
kill -TERM $pid
wait $pid || fail "the installed node did not stop cleanly on SIGTERM"
echo "installed node ran a script and answered covey status"

apt-get remove -y -qq covey >/dev/null
[ ! -e /usr/bin/covey ] || fail "/usr/bin/covey left after apt remove"
[ -f /var/lib/covey/scripts/hello.lua ] || fail "apt remove deleted the scripts"
apt-get purge -y -qq covey >/dev/null
[ ! -e /var/lib/covey ] || fail "/var/lib/covey left after apt purge"
! getent passwd covey >/dev/null || fail "covey user left after apt purge"
echo "PASSED: apt install, run, remove, purge of $(basename "$deb")"
