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
EXPOSE 8000 8404
ENTRYPOINT []
CMD ["haproxy", "-db", "-f", "/etc/haproxy/haproxy.cfg"]
