# The fixture masters are lab scripts with notebook magics, not test modules.
collect_ignore_glob = ["fixture/*"]
