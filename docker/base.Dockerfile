# A local Debian base for air-gapped builds: `docker/images.py` (make images) turns a debootstrap root file system
# (minbase + python3, python3-venv; + git for the training image) into an image when the public base cannot be
# pulled. Build context: build/base/<image>/, holding rootfs.tar.
FROM scratch
ADD rootfs.tar /
ENV LANG=C.UTF-8
CMD ["python3"]
