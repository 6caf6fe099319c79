from kdtool.cli import run

run()
