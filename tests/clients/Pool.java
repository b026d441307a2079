// HikariCP with pgjdbc (Debian's packages) through the proxy (#22): two
// pools, one with HikariCP's default health check (JDBC4 isValid) and one
// with connectionTestQuery; about 20 queries a second each for the given
// seconds, no retries; prints one JSON object as pools.py does. pgjdbc
// prepares its statements on the server after five uses, so they must move
// with the session.
//
//     java -cp HikariCP.jar:postgresql.jar:slf4j-api.jar Pool.java JDBC_URL SECONDS

import com.zaxxer.hikari.HikariConfig;
import com.zaxxer.hikari.HikariDataSource;
import java.sql.Connection;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.concurrent.ConcurrentHashMap;

public class Pool {
    static String json(String s) {
        return "\"" + s.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", " ") + "\"";
    }

    public static void main(String[] args) throws Exception {
        String url = args[0];
        long end = System.currentTimeMillis() + (long) (Double.parseDouble(args[1]) * 1000);
        Map<String, String> results = new ConcurrentHashMap<>();
        List<Thread> threads = new ArrayList<>();
        for (String name : new String[] {"HikariCP", "HikariCP connectionTestQuery"}) {
            HikariConfig config = new HikariConfig();
            config.setJdbcUrl(url);
            config.setUsername("app");
            config.setMaximumPoolSize(4);
            if (name.endsWith("connectionTestQuery")) {
                config.setConnectionTestQuery("SELECT 1");
            }
            HikariDataSource ds = new HikariDataSource(config);
            Thread t = new Thread(() -> {
                List<String> users = new ArrayList<>();
                List<String> failures = new ArrayList<>();
                int queries = 0;
                while (System.currentTimeMillis() < end) {
                    queries++;
                    try (Connection c = ds.getConnection();
                            PreparedStatement s = c.prepareStatement("SELECT current_user, ?::int")) {
                        s.setInt(1, 42);
                        try (ResultSet r = s.executeQuery()) {
                            r.next();
                            String user = r.getString(1);
                            if (users.isEmpty() || !users.get(users.size() - 1).equals(user)) {
                                users.add(user);
                            }
                        }
                    } catch (Exception e) {
                        failures.add(e.getClass().getSimpleName() + ": " + e.getMessage());
                    }
                    try {
                        Thread.sleep(50);
                    } catch (InterruptedException e) {
                        return;
                    }
                }
                ds.close();
                StringBuilder b = new StringBuilder("{\"queries\":" + queries + ",\"failed\":" + failures.size());
                b.append(",\"failures\":[");
                for (int i = 0; i < Math.min(10, failures.size()); i++) {
                    b.append(i > 0 ? "," : "").append(json(failures.get(i)));
                }
                b.append("],\"users\":[");
                for (int i = 0; i < users.size(); i++) {
                    b.append(i > 0 ? "," : "").append(json(users.get(i)));
                }
                results.put(name, b.append("]}").toString());
            });
            threads.add(t);
            t.start();
        }
        for (Thread t : threads) {
            t.join();
        }
        StringBuilder out = new StringBuilder("{");
        int i = 0;
        for (Map.Entry<String, String> e : results.entrySet()) {
            out.append(i++ > 0 ? "," : "").append(json(e.getKey())).append(":").append(e.getValue());
        }
        System.out.println(out.append("}"));
    }
}
