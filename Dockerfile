# The worker image. Its install steps are the README's: a virtual environment and `pip install -e`.
# Ubuntu 24.04's python3 is 3.12: stl needs 3.11 or newer, which 22.04's (3.10) is not.
FROM nvidia/cuda:12.6.3-runtime-ubuntu24.04
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-pip make git \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/stl
COPY . /opt/stl
# On a GPU image pip's default torch is the CUDA build; the Makefile installs the CPU build only
# where no NVIDIA driver is present.
RUN python3 -m venv /opt/stl/.venv \
    && /opt/stl/.venv/bin/pip install --no-cache-dir --upgrade pip \
    && /opt/stl/.venv/bin/pip install --no-cache-dir -e '.[dashboard]'
ENV PATH=/opt/stl/.venv/bin:$PATH PYTHONUNBUFFERED=1
STOPSIGNAL SIGTERM
CMD ["stl", "worker"]
