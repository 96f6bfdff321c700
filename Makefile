# Thin wrapper around meson/ninja.  See README.md.
BUILD      ?= build
ASAN_BUILD ?= build-asan
TSAN_BUILD ?= build-tsan
PREFIX     ?= /usr/local
MESON      ?= meson

# Debian packages needed to build (every target that builds), and in
# addition to test, run the demo and the benchmarks.  scripts/deps.sh
# installs the missing ones as root, else prints the apt-get line and stops
# (PMS_SKIP_DEPS=1 skips the check, for machines that are not Debian).
BUILD_DEPS = build-essential meson ninja-build pkg-config zlib1g-dev libzstd-dev
DEPS = $(BUILD_DEPS) \
       qemu-utils qemu-system-x86 qemu-block-extra fuse3 libfuse3-dev \
       libnbd-dev nbdkit libjson-c-dev liburing-dev clang libclang-rt-14-dev \
       python3 strace
# pmemsnap serve's tests: PMDK (libpmemobj, pmempool), a small guest (kernel, busybox)
DEPS += libpmemobj-dev pmdk-tools busybox-static cpio linux-image-amd64

.PHONY: all deps build-deps check check-fast demo bench install clean

all: build-deps $(BUILD)/build.ninja
	ninja -C $(BUILD)

$(BUILD)/build.ninja: | build-deps
	$(MESON) setup $(BUILD)

build-deps:
	@bash scripts/deps.sh $(BUILD_DEPS)

deps: build-deps
	@bash scripts/deps.sh $(DEPS)

# Every suite in the normal build, then every suite tagged 'asan' in an
# ASan+UBSan build (PMS_NO_ASAN=1 skips that second pass), then the
# concurrency tests (suite 'tsan') in a ThreadSanitizer build
# (PMS_NO_TSAN=1 skips it).
check: deps all
	@rc=0; \
	$(MESON) test -C $(BUILD) --print-errorlogs --num-processes 2 || rc=1; \
	if [ -z "$$PMS_NO_ASAN" ]; then \
	  { [ -f $(ASAN_BUILD)/build.ninja ] || \
	    $(MESON) setup $(ASAN_BUILD) -Db_sanitize=address,undefined -Db_lundef=false; } && \
	  ninja -C $(ASAN_BUILD) && \
	  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
	  UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	  $(MESON) test -C $(ASAN_BUILD) --print-errorlogs --num-processes 2 --suite asan || rc=1; \
	fi; \
	if [ -z "$$PMS_NO_TSAN" ]; then \
	  { [ -f $(TSAN_BUILD)/build.ninja ] || \
	    $(MESON) setup $(TSAN_BUILD) -Db_sanitize=thread -Db_lundef=false; } && \
	  ninja -C $(TSAN_BUILD) && \
	  $(MESON) test -C $(TSAN_BUILD) --print-errorlogs --num-processes 2 --suite tsan || rc=1; \
	fi; \
	exit $$rc

# QEMU 7.2's own iotests (fetched once into .cache/), ours as qemu-io vs
# QEMU's qemu-io: prints the table (tests/iotests/run.sh).
.PHONY: iotests
iotests: deps all
	bash tests/iotests/run.sh $(BUILD)

demo: deps all
	bash demo/demo.sh $(BUILD)

bench: deps all
	bash bench/run.sh $(BUILD)

install: all
	$(MESON) configure $(BUILD) -Dprefix=$(abspath $(PREFIX))
	$(MESON) install -C $(BUILD)

clean:
	rm -rf $(BUILD) $(ASAN_BUILD) $(TSAN_BUILD)
