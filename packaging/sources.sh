# Sourced by packaging/build-deb and packaging/build-rpm, from the top of the
# checkout: which files make up ublkd's source package.

SOURCES="LICENSE README.md pyproject.toml setup.py ublkd units conf docs packaging"

# Every file of SOURCES that git tracks or would track (no build output,
# no compiled extension of an editable install), sorted, one per line.
source_files() {
    if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        git ls-files -co --exclude-standard -- $SOURCES | while read -r file; do
            [ -f "$file" ] && echo "$file"
        done
    else
        find $SOURCES -type f ! -name '*.so' ! -name '*.pyc' ! -path '*.egg-info/*'
    fi | LC_ALL=C sort
}
