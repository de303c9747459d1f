# ublkd developer entry points.  `make check` is the test command of the
# README and of CI; `make demo` is the README's demo.
PYTHON := .venv/bin/python

.PHONY: check demo check-fresh bootstrap unit-test guest-shell bench install-units clean

check: bootstrap
	$(PYTHON) -m pytest

# The demo: a device outlives kills of its daemon (tests/testbed/demo.py).
demo: bootstrap
	$(PYTHON) -m tests.testbed demo

# `make check` and `make demo` on a new Debian 12 root (debootstrap, chroot)
# with a clone of the committed HEAD: proves the install steps are complete.
check-fresh:
	./scripts/check-fresh

bootstrap:
	./scripts/bootstrap

unit-test: bootstrap
	$(PYTHON) -m pytest tests/unit

# A guest with a root shell on this terminal (Ctrl-A X quits).
guest-shell: bootstrap
	$(PYTHON) -m tests.testbed shell

clean:
	rm -rf build .venv *.egg-info

# fio in the guest: ublkd against loop, null_blk and the kernel's NBD client
# (see benchmarks/bench.py).
bench: bootstrap
	$(PYTHON) -m benchmarks.bench

# Install the units for the ublkd of this checkout (what the guest tests
# do): ExecStart= points at $(UBLKD) instead of /usr/bin/ublkd.
UBLKD ?= $(abspath .venv/bin/ublkd)
UNITDIR ?= /etc/systemd/system
GENERATORDIR ?= /etc/systemd/system-generators
# The D-Bus API's bus files and polkit action (where the bus and polkit
# look for a local administrator's files; the packages use /usr/share).
DBUSPOLICYDIR ?= /etc/dbus-1/system.d
DBUSSERVICEDIR ?= /usr/local/share/dbus-1/system-services
POLKITACTIONDIR ?= /usr/share/polkit-1/actions
install-units:
	install -d $(UNITDIR)
	for unit in units/*.service; do \
		sed 's|/usr/bin/ublkd|$(UBLKD)|' $$unit > $(UNITDIR)/$$(basename $$unit); \
	done
	install -D -m 0644 units/modprobe@ublk_drv.service.d/ublkd.conf \
		$(UNITDIR)/modprobe@ublk_drv.service.d/ublkd.conf
	install -D -m 0755 units/generators/ublkd-generator $(GENERATORDIR)/ublkd-generator
	install -D -m 0644 units/dbus-1/system.d/org.ublkd1.conf $(DBUSPOLICYDIR)/org.ublkd1.conf
	install -D -m 0644 units/dbus-1/system-services/org.ublkd1.service \
		$(DBUSSERVICEDIR)/org.ublkd1.service
	install -D -m 0644 units/polkit-1/actions/org.ublkd1.policy \
		$(POLKITACTIONDIR)/org.ublkd1.policy
	systemctl daemon-reload
	systemctl reload dbus.service

# Distro packages (docs/packaging.md).  `deb` installs its build dependencies
# with apt-get, builds build/deb/ublkd_VERSION_ARCH.deb and runs lintian;
# VERSION=x.y.z builds the same sources as another version (OUTDIR too).
# `rpm` checks packaging/rpm/ublkd.spec with rpmspec -P and builds the
# source RPM; the binary RPM needs Fedora's macros (rpmbuild --rebuild there).
.PHONY: deb rpm
deb:
	./packaging/build-deb

rpm:
	./packaging/build-rpm
