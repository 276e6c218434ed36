# Prometheus from Debian's own package, for clusters without a registry (the test bed and the demo).
#   buildah bud -t slmpack/prometheus:0.1.0 -f images/prometheus.Dockerfile images
FROM docker.io/library/debian:bookworm-slim
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus ca-certificates \
 && rm -rf /var/lib/apt/lists/* /var/lib/prometheus/*
# Debian's package made the prometheus user; the pod runs it by number, with its data under /prometheus.
USER 65534:65534
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
