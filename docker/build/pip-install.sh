#!/bin/sh
# `pip install` for an image build, run from a bind mount of docker/build/ (so it never lands in a
# layer). Two things a build host may need that must not ship either:
# - the build secret `build_ca` (a PEM file of CAs that sign intercepted HTTPS, e.g. a company
#   proxy): added to the image's own bundle for this one command, in a file removed after it;
# - wheels in docker/build/wheels/ (e.g. a CPU torch wheel the index does not carry): pip looks
#   there first. A missing folder is only a warning.
set -eu
bundle=""
if [ -s /run/secrets/build_ca ]; then
    bundle=$(mktemp)
    trap 'rm -f "$bundle"' EXIT
    cat /etc/ssl/certs/ca-certificates.crt /run/secrets/build_ca > "$bundle"
    export PIP_CERT="$bundle"
fi
pip install --no-cache-dir --find-links /build/wheels "$@"
