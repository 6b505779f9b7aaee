#!/bin/sh
# Install promtool (Debian's `prometheus` package) so `promtool check metrics`
# runs in tests/integration/test_metrics.py. Called from CI; safe to run by hand.
#
# - promtool already on PATH: nothing to do.
# - not root, or no apt-get: print why and exit 0 (the test then skips, saying so).
# - root with apt-get: install non-interactively, without recommends, and without
#   starting the prometheus service the package ships (a temporary policy-rc.d
#   answers "do not start" when the system has none). A failed install exits 1 so
#   CI shows it instead of silently skipping the test.
set -eu

say() { echo "ci-setup-promtool: $*"; }

if command -v promtool >/dev/null 2>&1; then
    say "promtool present: $(promtool --version 2>&1 | head -n 1)"
    exit 0
fi
if [ "$(id -u)" != "0" ]; then
    say "not root; not installing prometheus (the promtool test will skip)"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    say "no apt-get here; not installing prometheus (the promtool test will skip)"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
policy=/usr/sbin/policy-rc.d
own_policy=""
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 0755 "$policy"
    own_policy=1
fi
cleanup() { if [ -n "$own_policy" ]; then rm -f "$policy"; fi; }
trap cleanup EXIT

install() { apt-get install -y --no-install-recommends -o Dpkg::Use-Pty=0 prometheus; }

# The package lists may be missing (slim images) or stale: update once, then retry.
if ! install >/tmp/ci-setup-promtool.log 2>&1; then
    say "first install attempt failed; running apt-get update"
    if ! { apt-get update -q && install; } >>/tmp/ci-setup-promtool.log 2>&1; then
        tail -n 20 /tmp/ci-setup-promtool.log >&2
        say "installing prometheus failed (log: /tmp/ci-setup-promtool.log)"
        exit 1
    fi
fi
say "installed: $(promtool --version 2>&1 | head -n 1)"
