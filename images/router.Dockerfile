# The router in front of a deployment's engines: HAProxy from Debian bookworm (2.6 LTS, with its
# Prometheus exporter built in). slmpack renders its configuration (core/router.py) and its agent
# (`slmpack router-agent`, in the operator image) adds the engines through the runtime API.
#   buildah bud -t slmpack/router:0.1.0 -f images/router.Dockerfile images
FROM docker.io/library/debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends haproxy \
 && rm -rf /var/lib/apt/lists/* \
 && haproxy -vv | grep -q PROMEX
USER 10001:10001
# The kubelet stops a container with its image's stop signal: SIGUSR1 is HAProxy's soft stop, which lets the
# requests in flight finish (SIGTERM would cut them). HAProxy's own image does the same.
STOPSIGNAL SIGUSR1
EXPOSE 8000 8404
ENTRYPOINT []
CMD ["haproxy", "-db", "-f", "/etc/haproxy/haproxy.cfg"]
