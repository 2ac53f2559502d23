# The fixture masters are lab scripts with notebook magics, and the hostile corpus is a builder
# loaded by its test: neither is a test module.
collect_ignore_glob = ["fixture/*", "hostile/*"]
