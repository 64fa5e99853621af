# libiscsi's initiator tools, run against the emuhba target by docker/compose.yaml (profile
# "test"). Build from the repository root:
#   docker build -f docker/initiator.Dockerfile -t emuhba-initiator .
ARG BASE=python:3.12-slim
FROM ${BASE}

# Python is not needed here; any Debian-based image with bash works. Sharing the target's BASE
# means one base image to fetch (or build offline) for both.
RUN set -eu; \
    export DEBIAN_FRONTEND=noninteractive; \
    apt-get update -qq; \
    apt-get install -y -qq --no-install-recommends libiscsi-bin; \
    rm -rf /var/lib/apt/lists/*

COPY docker/initiator/run-initiator.sh /usr/local/bin/run-initiator
# Through bash: the script need not keep its executable bit (a checkout may lose it).
ENTRYPOINT ["bash", "/usr/local/bin/run-initiator"]
