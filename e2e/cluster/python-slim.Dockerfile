# A stand-in for the official python:3.11-slim, built from Debian bookworm (whose python3 is 3.11)
# where no registry is reachable. Images in images/ build FROM it unchanged.
FROM docker.io/library/debian:bookworm-slim
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-pip python3-venv ca-certificates \
 && ln -s /usr/bin/python3 /usr/local/bin/python \
 && rm -rf /var/lib/apt/lists/*
# Debian marks its Python as externally managed; the official image does not.
ENV PIP_BREAK_SYSTEM_PACKAGES=1 PYTHONDONTWRITEBYTECODE=1
CMD ["python3"]
