#!/usr/bin/env bash
# `apt-get update` for the build and test scripts, which a mirror caught
# mid-sync ("File has unexpected size ... Mirror sync in progress?") must
# not fail: retried twice (a short pause: a failing index often stays
# stale for hours, and six scripts call this), then the indexes that did
# update and those already on the machine are used, with a warning (an
# install that then lacks a package fails on its own, naming it).
set -uo pipefail
sudo=""
[ "$(id -u)" = 0 ] || sudo=sudo
for attempt in 1 2 3; do
  $sudo apt-get update -qq && exit 0
  [ "$attempt" = 3 ] && break
  echo "apt-get update failed (attempt $attempt of 3); retrying in $((attempt * 5)) s" >&2
  sleep $((attempt * 5))
done
echo "WARNING: apt-get update kept failing; using the package indexes already on this machine" >&2
exit 0
