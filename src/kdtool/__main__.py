from kdtool.launch import run

run()
